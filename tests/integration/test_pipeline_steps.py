"""The real diffusers pipeline (tiny model) reports each denoising step to its caller."""


from serve_app.config import AppConfig
from serve_app.model.pipeline import load_generator
from serve_app.protocol import GenerationItem


def test_on_step_is_called_once_per_denoising_step(tmp_path):
    config = AppConfig.model_validate(
        {"model": {"cache_dir": str(tmp_path), "warmup_sizes": []}, "replica": {"num_cpus": 1}})
    generator = load_generator(config)
    steps = []
    [[image]] = generator.generate([GenerationItem("steps", 512, 512, 3, seed=1)],
                                   on_step=steps.append)
    assert steps == [1, 2, 3]
    assert image.shape == (512, 512, 3)
    [[same]] = generator.generate([GenerationItem("steps", 512, 512, 3, seed=1)])
    assert (same == image).all()


def test_image_to_image_shares_the_weights_and_is_seeded(tmp_path):
    import numpy as np

    config = AppConfig.model_validate(
        {"model": {"cache_dir": str(tmp_path), "warmup_sizes": []}, "replica": {"num_cpus": 1}})
    generator = load_generator(config)
    text_item = GenerationItem("text", 256, 256, 2, seed=3)
    [[before]] = generator.generate([text_item])
    img2img = generator.img2img_pipeline()
    # from_pipe: the very same modules, no second copy of the weights
    assert img2img.unet is generator.pipe.unet
    assert img2img.vae is generator.pipe.vae
    assert img2img.text_encoder_2 is generator.pipe.text_encoder_2
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    item = GenerationItem("edit", 256, 256, 4, seed=5, init_image=b"png", strength=0.5)
    steps, previews = [], []
    [[image]] = generator.generate([item], on_step=steps.append,
                                   on_preview=lambda n, p: previews.append((n, p)),
                                   init_images=[source])
    assert steps == [1, 2]  # 4 steps at strength 0.5
    assert [n for n, _ in previews] == [1, 2]
    assert [p[0].shape for _, p in previews] == [(32, 32, 3), (32, 32, 3)]
    assert image.shape == (256, 256, 3)
    [[same]] = generator.generate([item], init_images=[source])
    assert np.array_equal(same, image)
    other = generator.generate([item], init_images=[255 - source])[0][0]
    assert not np.array_equal(other, image)
    # the shared modules are left as text-to-image had them (dtype, packed weights)
    [[after]] = generator.generate([text_item])
    assert np.array_equal(after, before)
