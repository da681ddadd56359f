"""The browser app (gradio): the model hub, one module per tab, and the launcher.

    python app.py [--model ID_OR_PATH] [--adapter DIR] ...      # or: famviz app ...

``famviz.app.launch.build_app(loaded)`` builds the UI around an already loaded model (tests use a tiny
random one). Every tab is built by one ``build_*_tab(context)`` call with the same ``AppContext``
(``famviz.app.hub``); what the user types is checked in one place (``famviz.app.inputs``).
"""

import os

# Before gradio is imported (every module of this package imports it after this): no usage statistics
# leave this machine, and hub ids resolve offline.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# While streaming, plots are redrawn at most this often; blocks that come faster update only the status
# line (every block still sends one update). Redrawing every plot costs a browser ~0.2 s on a desktop
# and 2-3 s on a busy 2-core machine; redraws sent faster than that queue up and freeze the page.
MIN_REDRAW_SECONDS = 2.0
