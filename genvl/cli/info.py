"""``genvl ui`` (serve the streamlit app) and ``genvl info [DIR]`` (what a model directory holds)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from genvl import __version__, runtime
from genvl.cli.common import Formatter, positive_int
from genvl.errors import GenvlError
from genvl.runtime import open_model


def _port(text: str) -> int:
    v = positive_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"a port must be in [1, 65535], got {v}")
    return v


# --------------------------------------------------------------------------------------------- ui
def cmd_ui(args) -> int:
    """``genvl ui``: serve genvl/ui/app.py with streamlit on localhost until stopped."""
    import importlib.util
    import signal
    import socket
    import subprocess

    from genvl.ui import APP_PATH, MODEL_ENV

    if importlib.util.find_spec("streamlit") is None:
        raise GenvlError("the UI needs streamlit: pip install \"genvl[ui]\"")
    md = open_model(args.model, "the UI")  # a bad directory fails here, in one line
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("localhost", args.port))
        except OSError:
            raise GenvlError(f"port {args.port} on localhost is in use; pick another with --port N") from None
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_PATH), "--server.address", "localhost",
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--server.runOnSave", "false", "--client.toolbarMode", "minimal"]
    print(f"genvl ui: serving {md.path} at http://localhost:{args.port} (Ctrl+C stops it)", flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, MODEL_ENV: str(md.path)})
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())  # stopping genvl ui stops the server
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code if code >= 0 else 128 - code


# ------------------------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    import torch

    if args.dir is None and not runtime.has_demo():
        print(f"genvl {__version__}; torch {torch.__version__}; "
              f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() else 'cpu'}")
        print("built-in demo model: not in this version (train one with: genvl train clip --data FOLDER --out DIR)")
        return 0
    from genvl.card import base_model
    from genvl.checkpoint import component_ref

    md = open_model(args.dir, "info")
    print(f"model directory: {md.path}  (genvl {md.meta.get('genvl_version', '?')})")
    base = base_model(md.meta)
    if base:
        print(f"finetuned from: {base['model']}" + (f" (sha256 {base['sha256']})" if base.get("sha256") else ""))
    for name, cls in md.components.items():
        chain = md.lineage(name)
        full = chain[-1][1]
        size = (full / "model.safetensors").stat().st_size
        print(f"  {name:<12} {cls}  {size / 2**20:.1f} MiB")
        for kind, folder in chain[:-1]:  # what is merged from where
            if kind == "lora":
                adapter = json.loads((folder / "lora.json").read_text())
                kib = (folder / "lora.safetensors").stat().st_size / 2**10
                print(f"    LoRA adapter ({kib:.0f} KiB, rank {adapter.get('rank')}) in {folder}, merged over:")
            else:
                print(f"    a reference in {folder} to:")
        if len(chain) > 1:
            print(f"    {component_ref(full)}")
    tok = md.path / md.meta.get("tokenizer", "tokenizer")
    print(f"  tokenizer    {'present' if tok.is_dir() else 'missing'}")
    for name, rec in md.meta.get("training", {}).items():
        size = f"{rec['pairs']} pairs" if "pairs" in rec else f"streamed from {rec.get('streamed_shards')} shards"
        print(f"training {name}: {rec.get('steps')} steps on {rec.get('data')} ({size}), "
              f"{rec.get('time')}, {rec.get('hardware')}")
    for kind, rec in md.meta.get("metrics", {}).items():
        vals = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.get("values", {}).items())
        print(f"metrics {kind}: {vals}")
    return 0


# ----------------------------------------------------------------------------------------- parser
def add_parsers(sub) -> None:
    """Add ``ui`` and ``info`` to the subcommands ``sub``."""
    u = sub.add_parser("ui", help="start the streamlit app", formatter_class=Formatter,
                       description="Serve the streamlit app on localhost (tabs: Generate, Variations, Interpolate,\n"
                       "Classify, Model) and print its address; needs pip install \"genvl[ui]\".")
    u.add_argument("--model", help="model directory (default: the built-in demo)")
    u.add_argument("--port", type=_port, default=8501, help="localhost port to serve on")
    u.set_defaults(func=cmd_ui)

    i = sub.add_parser("info", help="what a model directory holds", formatter_class=Formatter)
    i.add_argument("dir", nargs="?", help="model directory (default: the built-in demo)")
    i.set_defaults(func=cmd_info)
