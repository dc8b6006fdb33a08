"""`python -m kdlib ...`, so that `accelerate launch -m kdlib ...` starts the CLI."""

from .cli import main

if __name__ == "__main__":
    main()
