"""megatron-core version check (megatron_ct/compat.py)."""

import logging

from megatron_ct.compat import TESTED_VERSIONS, check_megatron_core_version, version_note


def test_tested_versions_pass_silently_and_others_are_named():
    assert "0.16.1" in TESTED_VERSIONS
    for v in TESTED_VERSIONS:
        assert version_note(v) is None
    newer = version_note("0.99.0")
    assert newer.startswith("megatron-core 0.99.0 is untested with megatron-ct (tested: 0.16.1")
    assert "newer than the newest tested" in newer
    older = version_note("0.12.3")
    assert "install megatron-core==0.16.1 (Python 3.11)" in older


def test_installed_version_is_logged(caplog):
    check_megatron_core_version.cache_clear()
    with caplog.at_level(logging.INFO, logger="megatron_ct.compat"):
        version = check_megatron_core_version()
    assert version in caplog.text
