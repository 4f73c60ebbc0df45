"""Transfer engine (DESIGN item 5): register memory, move batches over shm, TCP, UCX.

Empty until the transfer-engine issue lands; the package exists so the layout
and the import rules are fixed from the start.
"""
