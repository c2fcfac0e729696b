"""``python -m loralens`` (and ``accelerate launch -m loralens train ...``) runs the CLI."""

from loralens.cli import app

if __name__ == "__main__":
    app()
