"""Drafting beyond heads, behind one interface (``base.Drafter``).

``lookup`` (prompt lookup), ``suffix`` (a suffix automaton over earlier outputs), ``merge`` (one
trie from several drafters, and the subtree worth verifying), ``calibrator`` (raw confidence ->
measured acceptance). Import from the modules: ``python -m mtpkit.drafting.suffix`` runs as a script.
"""
