"""`python -m ddpm_mnist ...` runs the `ddpm` command (also under torchrun)."""

from ddpm_mnist.cli import main

if __name__ == "__main__":
    main()
