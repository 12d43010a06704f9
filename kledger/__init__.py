"""kledger: lifelong knowledge editing with a versioned, append-only edit ledger.

The code lives in three sub-packages, installed under this namespace:
``kledger.ledger`` (records, deltas, store, compositor), ``kledger.editors`` (methods that
compute deltas) and ``kledger.cli`` (the ``kledger`` command).
"""

__version__ = "0.1.0"
