"""The maths a learner came for, each module against its paper: the noise schedules (`schedule`),
the forward process and the training loss (`diffusion`), the reverse process, one class per sampler,
on x_t or in the sigma view (`samplers`; their names and step limits are in `config.sampler_names`),
the U-Net (`unet`), the loops that edit rather than sample (`editing`: SDEdit, RePaint, slerp), and
the variational bound in bits per dimension (`likelihood`).

It imports nothing of the package but the config dataclasses and `rng`; training, sampling to
files, evaluation and the CLI are built on it.
"""
