"""Shared by every test folder: pytest puts this folder on sys.path, so helpers such as
minilm_reference import the same way from tests/, tests/core/ and tests/render/."""
