import pytest

from serve_app.pipeline import device_and_dtype


@pytest.mark.parametrize("num_gpus,dtype,expected", [
    (0, "bfloat16", ("cpu", "bfloat16")),
    (0, "float32", ("cpu", "float32")),
    (1, "bfloat16", ("cuda", "float16")),
    (0.5, "float16", ("cuda", "float16")),
    (1, "float32", ("cuda", "float32")),
])
def test_device_and_dtype(num_gpus, dtype, expected):
    assert device_and_dtype(num_gpus, dtype) == expected


def test_float16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="1000x slower"):
        device_and_dtype(0, "float16")
