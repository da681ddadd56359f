"""famviz app: the live memory inspector (the UI lives in ``famviz.app``; this file only launches it,
as ``famviz app`` does).

python app.py [--model ID_OR_PATH] [--adapter DIR] [--device auto|cpu|cuda]
              [--dtype auto|bfloat16|float32] [--host 127.0.0.1] [--port 7860]
"""

import sys
import time

STARTED = time.perf_counter()  # before gradio and torch load: the app logs what each phase of start-up took

from famviz.commands.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(started=STARTED))
