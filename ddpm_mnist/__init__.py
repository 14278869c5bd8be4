"""ddpm-mnist: train and sample denoising diffusion models (Ho et al. 2020) on MNIST."""

__version__ = "0.1.0"
