"""The browser app (gradio): the model hub, one module per tab, and the launcher.

    python app.py [--model ID_OR_PATH] [--adapter DIR] ...      # or: python -m famviz.app.launch

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
