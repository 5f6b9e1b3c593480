"""``python -m mtpkit`` (and ``accelerate launch -m mtpkit finetune ...``) runs the ``mtpkit`` command."""

from mtpkit.cli.app import main

main()
