"""Flow-matching schedules, samplers and guidance."""

from .guidance import cfg_velocity
from .samplers import SAMPLERS, flow_timesteps, img2img_timesteps, sample_dpmpp_2m, sample_euler, sample_heun, seeded_noise

__all__ = ["SAMPLERS", "cfg_velocity", "flow_timesteps", "img2img_timesteps", "sample_dpmpp_2m", "sample_euler", "sample_heun", "seeded_noise"]
