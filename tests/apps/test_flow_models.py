"""Flow-matching models in the registry and the jobs: a pipeline folder with a FlowMatch scheduler is a velocity
model on the rectified-flow process, and the jobs' default schedule follows the model (``flow:shift=S``)."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

from diffsamplers.apps.registry import load_model
from diffsamplers.apps.samplers import make_sampler
from diffsamplers.noise import RectifiedFlow


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_pipeline")
    torch.manual_seed(0)
    UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).save_pretrained(root / "unet")
    FlowMatchEulerDiscreteScheduler(shift=2.5).save_pretrained(root / "scheduler")
    return root


def test_a_flow_pipeline_folder_is_a_velocity_model(flow_folder):
    bundle = load_model(str(flow_folder))
    assert isinstance(bundle.process, RectifiedFlow)
    assert bundle.denoiser.prediction_type == "flow_prediction"  # a FlowMatch config names none: not ε
    assert bundle.default_schedule == "flow:shift=2.5"


def test_the_default_schedule_follows_the_model(flow_folder):
    assert load_model("gmm").default_schedule == "linspace"
    assert load_model("gmm-flow").default_schedule == "flow:shift=3"
    bundle = load_model("gmm-flow")
    images, _ = make_sampler(bundle, "dpm++2m", 6)(range(2))  # no schedule given: the flow grid
    assert images.shape == (2, 1, 8, 8)
    same, _ = make_sampler(bundle, "dpm++2m", 6, "flow:shift=3")(range(2))
    assert torch.equal(images, same)
