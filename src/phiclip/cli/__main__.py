"""``python -m phiclip.cli``: the ``phiclip`` command."""

from phiclip.cli import main

main()
