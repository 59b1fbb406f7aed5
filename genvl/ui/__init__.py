"""The streamlit UI started by ``genvl ui``.

``app.py`` is the page (streamlit widgets only); ``actions.py`` holds what its buttons do, as plain
functions over the same pipelines the command line calls (testable without a browser).
"""

from pathlib import Path

APP_PATH = Path(__file__).with_name("app.py")
# The model directory the app opens first; ``genvl ui --model DIR`` sets it for the server process.
MODEL_ENV = "GENVL_UI_MODEL"
