"""Bluetooth without hardware: a bleak backend over bumble virtual controllers and virtual wearables."""
