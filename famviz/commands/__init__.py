"""The command line's commands, one module each (``famviz.cli`` builds the parser from them).

Each module owns its command: ``add_parser(commands)`` adds its options to the CLI's subparsers, ``run(args)``
turns the parsed options into the library's typed arguments, runs it with its progress bar and prints the
result, returning the exit status. User errors are ``FamvizError``s (one line, status 2). A module imports
only light things at import time (no torch, no gradio), so that the parser and ``--help`` stay fast; the
library is imported when the command runs.
"""

COMMANDS = ("stream", "passkey", "ablate", "export", "evaluate", "train", "bench", "app")
