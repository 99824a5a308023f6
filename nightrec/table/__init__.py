"""The published table, for whoever reads it: the contract (``contract``), the reader
(``reader``), the HTTP endpoint (``serve``) and their object access (``objects``).

Standard library, pyarrow and boto3 only, and no other nightrec folder (tests/test_layering.py):
this package is the ``nightrec-reader`` distribution (reader/pyproject.toml) that installs alone.
"""
