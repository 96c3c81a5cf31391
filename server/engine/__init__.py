"""The local engine: weights, planning and running models on a device."""
