"""Offline training for steerserve: RED edit vectors and RAHF preference representations."""
