"""The ``steerserve`` console script: the one place that composes server, training and basemodel."""
