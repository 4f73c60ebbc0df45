"""What operators run: the ``kvstore`` command, the monitor and trace replay."""
