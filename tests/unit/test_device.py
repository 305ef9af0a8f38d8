import pytest

from serve_app.model.cpu import detect
from serve_app.model.diffusers_generator import device_and_dtype

AVX2 = detect("flags\t: sse2 avx avx2 fma\n", env={})
AMX = detect("flags\t: avx2 fma avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_bf16\n",
             env={})


@pytest.mark.parametrize("num_gpus,dtype,caps,expected", [
    (0, "auto", AMX, ("cpu", "bfloat16")),
    (0, "auto", AVX2, ("cpu", "float32")),
    (0, "bfloat16", AMX, ("cpu", "bfloat16")),
    (0, "float32", AMX, ("cpu", "float32")),
    (1, "auto", AVX2, ("cuda", "float16")),
    (0.5, "float16", AVX2, ("cuda", "float16")),
    (1, "float32", AMX, ("cuda", "float32")),
])
def test_device_and_dtype(num_gpus, dtype, caps, expected):
    device, choice = device_and_dtype(num_gpus, dtype, caps)
    assert (device, choice.name) == expected


def test_float16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="1000x slower"):
        device_and_dtype(0, "float16", AMX)
