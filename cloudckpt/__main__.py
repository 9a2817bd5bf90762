"""``python -m cloudckpt``: the ``cloudckpt`` command."""

from .cli import main

if __name__ == "__main__":
    main()
