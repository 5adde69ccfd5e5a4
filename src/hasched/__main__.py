"""``python -m hasched``: the CLI, with the working directory importable (``--module``)."""

from hasched.cli import main

main()
