"""The cluster: the directory of which node holds which block, and a node's membership in it."""
