"""EmpathDiffuser library: models, encoders, diffusion maths, data and metrics."""
