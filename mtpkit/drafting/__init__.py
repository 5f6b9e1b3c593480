"""Drafting beyond heads, behind one interface (``base.Drafter``).

``lookup`` (prompt lookup), ``suffix`` (a suffix automaton over earlier outputs), ``recycle`` (token recycling:
each token's top-k successors from the verification logits), ``merge`` (one trie from several drafters, and the
subtree worth verifying), ``calibrator`` (raw confidence -> measured acceptance). Import from the modules:
``python -m mtpkit.drafting.suffix`` runs as a script.
"""
