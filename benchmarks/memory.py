"""Training memory: peak per stage for one step, gradient checkpointing on the decoder, FSDP against DDP.

1. **Per stage** (decoder, token LM, prior, CLIP; built as ``genvl train`` builds them, see
   ``benchmarks/train_common.py``): one training step (``task.loss`` -> backward -> AdamW), each
   configuration in a fresh process, after one warm-up step (optimizer state allocated, caches
   filled). Reported:

   - ``peak_training``: the peak during the step minus the memory before the model was built: what
     training adds (parameters, gradients, optimizer state, frozen encoders, activations). CUDA:
     ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set (``VmHWM``, reset
     with ``/proc/self/clear_refs`` before the step) minus its resident set after the imports,
     with glibc told to return freed blocks at once (``MALLOC_MMAP_THRESHOLD_``,
     ``MALLOC_TRIM_THRESHOLD_``) so that freed memory is not counted;
   - ``step_peak``: the peak during the step minus the memory just before it;
   - ``saved_for_backward``: bytes of the distinct tensors autograd saves for backward in the
     forward (``torch.autograd.graph.saved_tensors_hooks``; parameters left out): the activations;
   - ``model_state``: parameters + gradients + AdamW state, counted from the tensors.

2. **Gradient checkpointing** (``gradient_checkpointing: true``) on the decoder UNet where
   activations dominate (64 px, batch 16 on the CPU): peak with against without; goal >= 40 % cut.

3. **FSDP against DDP**: two CPU processes (gloo, ``torchrun``) train a ~230M-parameter token LM
   (Llama) with DDP and with FSDP2 (``torch.distributed.fsdp.fully_shard`` per decoder layer).
   Reported per process: model state (local parameters + gradients + AdamW state), peak resident
   set and peak data segment (``VmData``, sampled every 2 ms). Then both run again with the data
   segment limited (``RLIMIT_DATA``) to the midpoint of their measured peaks: the budget per process
   under which FSDP trains and DDP does not.

    python benchmarks/memory.py                                   # GPU: base sizes
    python benchmarks/memory.py --device cpu                      # CPU: small sizes, 1 thread
    python benchmarks/memory.py --device cpu --skip-dist --stages decoder
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_common import (  # noqa: E402
    BATCH, STAGES, BareStep, Variant, at_least, device_name, goal, pick_device, prepare_stage, print_goals,
    set_threads, write_result,
)

MIB = 2**20
# glibc: every block of 64 KiB or more is its own mapping, returned to the system when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# ------------------------------------------------------------------------------------ process memory
def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``, ``VmData``)."""
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def _release_freed() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class DataPeak:
    """The largest ``VmData`` seen by a thread reading it every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002):
        self.peak, self.interval, self._stop = _status("VmData"), interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("VmData"))
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status("VmData"))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds of parameters, gradients (one per trainable parameter) and optimizer state."""
    params = [_local(p) for p in model.parameters()]
    out = {
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(_local(p).numel() * _local(p).element_size() for p in model.parameters() if p.requires_grad),
        "optimizer": sum(_local(v).numel() * _local(v).element_size() for s in optimizer.state.values()
                         for v in s.values() if torch.is_tensor(v)),
    }
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


class SavedBytes:
    """Counts the distinct storages autograd saves for backward (parameters excluded)."""

    def __init__(self, model: torch.nn.Module):
        self.skip = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        if t.device.type != "meta":
            st = t.untyped_storage()
            if st.data_ptr() not in self.skip:
                self.seen[st.data_ptr()] = st.nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


# ------------------------------------------------------------------------------------ one stage step
def _import_libraries(stage: str) -> None:
    import importlib

    import accelerate  # noqa: F401
    from diffusers import PriorTransformer, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection, LlamaForCausalLM  # noqa: F401

    from genvl.training.tasks import TASKS

    importlib.import_module(TASKS[stage].split(":")[0])


def child_step(spec: dict) -> dict:
    """Run in a fresh process: one measured training step of a stage; returns the figures."""
    device = torch.device(spec["device"])
    set_threads(device, spec.get("threads"))
    gpu = device.type == "cuda"
    _import_libraries(spec["stage"])  # library code is not training memory: loaded before the baseline
    if gpu:
        torch.zeros(1, device=device)  # the CUDA context
    _release_freed()
    base = torch.cuda.memory_allocated(device) if gpu else _status("VmRSS")
    setup = prepare_stage(spec["stage"], spec["size"], Path(spec["work"]), spec["batch"], spec["images"],
                          image_size=spec.get("image_size"))
    variant = Variant(spec["name"], spec["mixed_precision"], gradient_checkpointing=spec["gradient_checkpointing"])
    bare = BareStep(setup, variant, device)
    bare.step()  # warm-up: optimizer state, caches
    _release_freed()
    if gpu:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        reset = True
    else:
        before = _status("VmRSS")
        reset = _reset_peak_rss()
    saved = SavedBytes(bare.model)
    t, c = time.perf_counter(), time.process_time()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss, _ = bare.task.loss(bare.train_model, bare.batch)
    bare.accelerator.backward(loss)
    state = model_state_bytes(bare.model, bare.optimizer)  # gradients are allocated here
    bare.optimizer.step()
    bare.optimizer.zero_grad(set_to_none=True)
    if gpu:
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
    peak = torch.cuda.max_memory_allocated(device) if gpu else _status("VmHWM")
    return {
        "stage": spec["stage"], "config": spec["name"], "batch": spec["batch"], "image_size": setup.cfg.data.image_size,
        "mixed_precision": spec["mixed_precision"], "gradient_checkpointing": spec["gradient_checkpointing"],
        "peak_training_mib": (peak - base) / MIB, "step_peak_mib": (peak - before) / MIB,
        "before_step_mib": (before - base) / MIB, "saved_for_backward_mib": saved.total / MIB,
        "model_state_mib": {k: v / MIB for k, v in state.items()}, "step_wall_s": seconds,
        # one thread: the CPU seconds are the step's cost whatever else runs on the machine
        "step_s": seconds if gpu else cpu_seconds,
        "peak_reset": reset, "method": "torch.cuda.max_memory_allocated" if gpu else
        "VmHWM (reset by clear_refs before the step) minus VmRSS after imports" if reset else
        "VmHWM over the process lifetime minus VmRSS after imports (clear_refs not allowed)",
    }


def run_child(spec: dict, timeout: int) -> dict:
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(spec.get("threads") or 1),
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"stage": spec["stage"], "config": spec["name"], "error": f"exit {r.returncode}: {tail[0][:300]}"}


# ------------------------------------------------------------------------------------ FSDP vs DDP
def dist_worker(args) -> None:
    """One of two torchrun processes: train the LM with DDP or FSDP2, write this rank's figures."""
    import resource

    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    out = Path(args.dist_out) / f"{args.dist_worker}-rank{rank}.json"
    info = {"mode": args.dist_worker, "rank": rank, "budget_mib": args.budget_mib, "status": "ok"}
    if args.budget_mib:
        limit = int(args.budget_mib * MIB)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.set_num_threads(1)
    sampler = DataPeak()
    _reset_peak_rss()
    dist.init_process_group("gloo")
    try:
        from genvl.models.lm import TokenLM, lm_config

        torch.manual_seed(0)
        cfg = lm_config("medium", num_layers=args.dist_layers, text_vocab_size=4096, codebook_size=8192,
                        image_tokens=64, text_len=28, vocab_multiple=64)
        model = TokenLM(cfg).train()
        info["params"] = sum(p.numel() for p in model.parameters())
        if args.dist_worker == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(model, gradient_as_bucket_view=True)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            train_model = model
        _release_freed()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, cfg.vocab_size, (args.dist_batch, cfg.max_len), generator=g)
        times = []
        for _ in range(args.dist_steps):
            t = time.perf_counter()
            logits = train_model(ids).logits  # (B, L, V)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     ids[:, 1:].reshape(-1))
            del logits
            loss.backward()
            if not info.get("model_state_mib"):
                info["model_state_mib"] = {k: v / MIB for k, v in model_state_bytes(model, opt).items()}
            opt.step()
            opt.zero_grad(set_to_none=args.dist_worker != "ddp")  # DDP's bucket views stay allocated
            times.append(time.perf_counter() - t)
            info["loss"] = float(loss)
        info["model_state_mib"] = {k: v / MIB for k, v in model_state_bytes(model, opt).items()}
        info["step_s"] = times
    except Exception as e:  # noqa: BLE001 - an allocation refused under the budget is the result
        info["status"] = "failed"
        info["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    info["peak_rss_mib"] = _status("VmHWM") / MIB
    info["peak_data_mib"] = sampler.stop() / MIB
    out.write_text(json.dumps(info))
    if info["status"] != "ok":
        os._exit(3)  # the other process may wait in a collective: torchrun ends it
    dist.barrier()
    dist.destroy_process_group()


def run_dist(mode: str, out: Path, args, budget_mib: float | None) -> list[dict]:
    for f in out.glob(f"{mode}-rank*.json"):
        f.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--dist-worker", mode, "--dist-out", str(out), "--dist-layers", str(args.dist_layers),
           "--dist-batch", str(args.dist_batch), "--dist-steps", str(args.dist_steps)]
    if budget_mib:
        cmd += ["--budget-mib", f"{budget_mib:.0f}"]
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.dist_timeout)
    ranks = []
    for rank in (0, 1):
        f = out / f"{mode}-rank{rank}.json"
        ranks.append(json.loads(f.read_text()) if f.is_file() else
                     {"mode": mode, "rank": rank, "budget_mib": budget_mib, "status": "failed",
                      "error": f"no result (torchrun exit {r.returncode}; the other process failed first)"})
    for info in ranks:
        info["wall_s"] = time.perf_counter() - t
    return ranks


def _dist_ok(ranks: list[dict]) -> bool:
    return all(r["status"] == "ok" for r in ranks)


def _worst(ranks: list[dict], key: str) -> float:
    """The largest figure over the processes (``model_state_mib``: its total)."""
    return max((r.get(key) or {}).get("total", 0.0) if key == "model_state_mib" else r.get(key, 0.0) for r in ranks)


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--size", choices=["tiny", "small", "base"], help="model sizes (default: base on GPU, small on CPU)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--batch", type=int, help="micro-batch of the per-stage step (default per stage and device)")
    p.add_argument("--gc-px", type=int, default=64, help="decoder resolution of the gradient checkpointing test")
    p.add_argument("--gc-batch", type=int, help="decoder batch of the gradient checkpointing test (16 CPU, 64 GPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--skip-dist", action="store_true", help="leave out FSDP against DDP")
    p.add_argument("--dist-layers", type=int, default=16, help="Llama layers of the FSDP / DDP model (16: ~230M)")
    p.add_argument("--dist-batch", type=int, default=2, help="sequences per process")
    p.add_argument("--dist-steps", type=int, default=2, help="training steps per run")
    p.add_argument("--dist-timeout", type=int, default=600, help="seconds per two-process run")
    p.add_argument("--work", help="folder for the synthetic data and model directories (default: a temp folder)")
    p.add_argument("--json", default="benchmarks/results/memory.json", help="where to write the results")
    # internal: a child process of one measurement, or a torchrun worker
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dist-worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    p.add_argument("--dist-out", help=argparse.SUPPRESS)
    p.add_argument("--budget-mib", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(child_step(json.loads(args.child))), flush=True)
        return {}
    if args.dist_worker:
        dist_worker(args)
        return {}

    device = pick_device(args.device)
    gpu = device.type == "cuda"
    set_threads(device, args.threads)
    size = args.size or ("base" if gpu else "small")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    tmp = tempfile.TemporaryDirectory(prefix="genvl-memory-") if not args.work else None
    work = Path(args.work or tmp.name)
    mp = "bf16" if gpu else "no"
    unit = "GPU memory allocated" if gpu else "resident memory"
    print(f"device: {device_name(device)}; torch {torch.__version__}; size {size}; {unit}")
    rows, goals = [], []

    def spec(stage, name, batch, gc_on=False, image_size=None):
        images = max(2 * batch, 16)
        prepare_stage(stage, size, work, batch, images, image_size=image_size)  # data written once, here
        return {"stage": stage, "name": name, "size": size, "work": str(work), "batch": batch, "images": images,
                "device": str(device), "threads": args.threads, "mixed_precision": mp, "gradient_checkpointing": gc_on,
                "image_size": image_size}

    # 1. one step per stage
    for stage in stages:
        batch = args.batch or BATCH[device.type][stage]
        r = run_child(spec(stage, f"{stage} {'bf16' if gpu else 'fp32'}", batch), timeout=1800)
        rows.append(r)
        if "error" in r:
            print(f"  {stage}: failed ({r['error']})")
        else:
            print(f"  {stage:<8} batch {batch:<4} peak {r['peak_training_mib']:9.1f} MiB  step {r['step_peak_mib']:9.1f} MiB"
                  f"  saved for backward {r['saved_for_backward_mib']:9.1f} MiB  model state "
                  f"{r['model_state_mib']['total']:8.1f} MiB")

    # 2. gradient checkpointing on the decoder UNet
    gc_batch = args.gc_batch or (64 if gpu else 16)
    pair = []
    for on in (False, True):
        name = f"decoder {args.gc_px}px batch {gc_batch}" + (" + gradient checkpointing" if on else "")
        r = run_child(spec("decoder", name, gc_batch, gc_on=on, image_size=args.gc_px), timeout=1800)
        rows.append(r)
        pair.append(r)
        if "error" in r:
            print(f"  {name}: failed ({r['error']})")
        else:
            print(f"  {name:<52} peak {r['peak_training_mib']:9.1f} MiB  step {r['step_peak_mib']:9.1f} MiB  saved "
                  f"{r['saved_for_backward_mib']:9.1f} MiB  {r['step_s']:.1f} s")
    if all("error" not in r for r in pair):
        off, on = pair
        cut = 100 * (1 - on["peak_training_mib"] / off["peak_training_mib"])
        step_cut = 100 * (1 - on["step_peak_mib"] / off["step_peak_mib"])
        saved_cut = 100 * (1 - on["saved_for_backward_mib"] / max(off["saved_for_backward_mib"], 1e-9))
        goals.append(goal("decoder gradient checkpointing: peak memory cut", cut, "%", ">= 40% lower peak",
                          at_least(cut, 40.0),
                          f"{unit} of one training step ({off['peak_training_mib']:.0f} -> {on['peak_training_mib']:.0f} "
                          f"MiB, model state and frozen CLIP included) on {device_name(device)}, decoder {size} at "
                          f"{args.gc_px} px, batch {gc_batch}; peak over the pre-step memory {step_cut:.0f}% lower, "
                          f"activations saved for backward {saved_cut:.0f}% lower; step {off['step_s']:.1f} -> "
                          f"{on['step_s']:.1f} s{'' if gpu else ' (CPU time)'} (the recomputation)"))
    else:
        goals.append(goal("decoder gradient checkpointing: peak memory cut", None, "%", ">= 40% lower peak",
                          "not measured here", "a run failed: " + "; ".join(r.get("error", "") for r in pair)))

    # 3. FSDP against DDP, two CPU processes
    dist_rows = []
    if not args.skip_dist:
        out = work / "dist"
        out.mkdir(parents=True, exist_ok=True)
        print(f"\nFSDP2 against DDP: 2 CPU processes (gloo), token LM with {args.dist_layers} layers, batch "
              f"{args.dist_batch} x {96} tokens per process")
        runs = {mode: run_dist(mode, out, args, None) for mode in ("ddp", "fsdp")}
        for mode, ranks in runs.items():
            dist_rows += ranks
            for r in ranks:
                st = r.get("model_state_mib", {}).get("total", float("nan"))
                print(f"  {mode:<5} rank {r['rank']}: {r['status']:<6} model state {st:8.1f} MiB  peak RSS "
                      f"{r.get('peak_rss_mib', 0):8.1f} MiB  peak data {r.get('peak_data_mib', 0):8.1f} MiB"
                      + (f"  ({r['error']})" if r["status"] != "ok" else ""))
        if _dist_ok(runs["ddp"]) and _dist_ok(runs["fsdp"]):
            d_data, f_data = _worst(runs["ddp"], "peak_data_mib"), _worst(runs["fsdp"], "peak_data_mib")
            budget = (d_data + f_data) / 2
            print(f"  budget per process (RLIMIT_DATA): {budget:.0f} MiB, between FSDP's {f_data:.0f} and DDP's "
                  f"{d_data:.0f} MiB peak data segment")
            limited = {mode: run_dist(mode, out, args, budget) for mode in ("ddp", "fsdp")}
            for mode, ranks in limited.items():
                for r in ranks:
                    r["mode"] = f"{mode} under budget"
                dist_rows += ranks
                status = "trained" if _dist_ok(ranks) else "failed: " + next(
                    (r.get("error", "") for r in ranks if r["status"] != "ok"), "")
                print(f"  {mode:<5} under {budget:.0f} MiB: {status}")
            fsdp_fits, ddp_fails = _dist_ok(limited["fsdp"]), not _dist_ok(limited["ddp"])
            ds = _worst(runs["ddp"], "model_state_mib")
            fs = _worst(runs["fsdp"], "model_state_mib")
            goals.append(goal("FSDP trains under a per-process budget where DDP does not", budget, "MiB",
                              "FSDP fits, DDP does not", "met" if fsdp_fits and ddp_fails else "missed",
                              f"RLIMIT_DATA {budget:.0f} MiB per process: FSDP2 "
                              f"{'trained' if fsdp_fits else 'failed'}, DDP {'failed' if ddp_fails else 'trained'}. "
                              f"Model state (params + grads + AdamW) per process {fs:.0f} MiB (FSDP2) vs {ds:.0f} MiB "
                              f"(DDP); peak RSS {_worst(runs['fsdp'], 'peak_rss_mib'):.0f} vs "
                              f"{_worst(runs['ddp'], 'peak_rss_mib'):.0f} MiB"))
        else:
            goals.append(goal("FSDP trains under a per-process budget where DDP does not", None, "MiB",
                              "FSDP fits, DDP does not", "not measured here",
                              "an unlimited run failed: " + "; ".join(r.get("error", "") for rs in runs.values()
                                                                      for r in rs if r["status"] != "ok")))

    print()
    print_goals(goals)
    result = write_result(
        args.json, "memory", device, args, goals, rows, size=size, dist=dist_rows,
        method={"peak": "torch.cuda.max_memory_allocated per configuration in a fresh process" if gpu else
                "per configuration in a fresh process: peak resident set (VmHWM, reset with clear_refs before the "
                "step) minus the resident set after the imports; glibc returns freed blocks at once "
                f"({', '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())})",
                "saved_for_backward": "distinct storages packed by torch.autograd.graph.saved_tensors_hooks in the "
                                      "forward, parameters excluded",
                "dist": "torchrun, 2 processes, gloo, 1 thread each; VmData sampled every 2 ms; the budget is an "
                        "RLIMIT_DATA limit on each process"},
    )
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
