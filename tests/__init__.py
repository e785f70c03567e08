"""The test suite, grouped by the layer it tests: core/, render/, web/ (web/v1, web/v2),
native/; test_package.py checks the package as a whole (layers, imports, version).
benchmarks/, container/ and load/ hold `make` targets' scripts, not tests."""
