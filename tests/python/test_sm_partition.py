"""gkv_ext._C.SmPartition: the device's SMs in two disjoint sets behind their own streams."""
import pytest
import torch

import gkv_ext
from gkv_ext import _C

from conftest import requires_cuda


@pytest.mark.skipif(gkv_ext.built_with_cuda, reason="the CPU build's error")
def test_cpu_build_says_it_needs_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA build"):
        _C.SmPartition(0, 16)


@requires_cuda
def test_partition_splits_the_sms_and_its_streams_compute():
    total = torch.cuda.get_device_properties(0).multi_processor_count
    part = _C.SmPartition(torch.cuda.current_device(), 16)
    assert part.sms(0) >= 16 and part.sms(1) >= 1
    assert part.sms(0) + part.sms(1) <= total
    a = torch.randn(512, 512, device="cuda")
    expected = a @ a
    for set_ in (0, 1):
        stream = torch.cuda.ExternalStream(part.stream(set_))
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            got = a @ a
        torch.cuda.current_stream().wait_stream(stream)
        torch.testing.assert_close(got, expected)


@requires_cuda
@pytest.mark.parametrize("first_sms, match", [(0, "first_sms must be >= 1"),
                                              (100000, "leaves no SMs|cuDevSmResourceSplit")])
def test_bad_partition_raises(first_sms, match):
    with pytest.raises(RuntimeError, match=match):
        _C.SmPartition(torch.cuda.current_device(), first_sms)


@requires_cuda
def test_bad_set_raises():
    part = _C.SmPartition(torch.cuda.current_device(), 16)
    with pytest.raises(RuntimeError, match="set must be 0 or 1"):
        part.stream(2)
