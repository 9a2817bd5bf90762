"""``python -m cloudckpt.cli``: the ``cloudckpt`` command."""

from . import main

if __name__ == "__main__":
    main()
