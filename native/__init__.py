"""Native copy extension (DESIGN item 9): gather/scatter of paged KV.

Empty until the native-extension issue lands; the package exists so the
layout and the import rules are fixed from the start.
"""
