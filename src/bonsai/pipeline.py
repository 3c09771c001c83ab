"""Prompt -> images: encode the prompt, prepare noise, denoise with guidance, decode.

    pipe = Pipeline.from_pretrained("bonsai-emoji")
    images = pipe("grinning face", steps=20, cfg=4.0, seed=1)

Each image of a batch has its own seed (seed, seed + 1, ...) and its own noise generator, so
image i of a batch equals a single run with seed + i.
"""

from __future__ import annotations

import os
import secrets
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from . import cpu_bf16
from .cuda_graph import GraphedModule, use_cuda_graph
from .heap import keep_large_blocks
from .images import flatten_on_white
from .limits import CFG_RANGE, MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS, last_seed
from .models.offload import on_device, sequential_offload
from .models.per_sample import per_sample
from .sampling import SAMPLERS, cfg_velocity, flow_timesteps, img2img_timesteps, seeded_noise
from .vml import settle_vml

# normal: every part stays on the device; lean: one part at a time (text encoder -> denoiser ->
# tiled decoder), weights kept in CPU memory between uses; offload: lean, and the denoiser's
# blocks visit the device one at a time (for GPUs smaller than the denoiser).
MEMORY_MODES = ("normal", "lean", "offload")
DECODE_BF16_MIN_PIXELS = 256 * 256  # decodes from this size run in bfloat16 on CPUs that compute it

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step, total, denoised estimate)


@dataclass(frozen=True)
class GenerationParams:
    """Everything needed to reproduce one image."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg: float = 4.0
    seed: int = 0
    width: int = 64
    height: int = 64
    sampler: str = "euler"
    shift: float = 1.0
    model: str = ""
    strength: float = 1.0  # img2img: how much of the init image is re-noised (1 = ignore it)

    def to_a1111(self) -> str:
        """The A1111 "parameters" text that image browsers and web UIs read back."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(
            f"Steps: {self.steps}, Sampler: {self.sampler}, CFG scale: {self.cfg:g}, Seed: {self.seed}, "
            f"Size: {self.width}x{self.height}, Model: {self.model}, Schedule shift: {self.shift:g}"
            + (f", Denoising strength: {self.strength:g}" if self.strength < 1 else "")
        )
        return "\n".join(lines)


@dataclass
class Generation:
    images: list[Image.Image]
    params: list[GenerationParams]
    samples: torch.Tensor = field(repr=False)  # decoded float samples [B, 3, H, W] in [-1, 1]
    warnings: list[str] = field(default_factory=list)  # the GenerationWarnings generate() also emitted


class InvalidRequest(ValueError):
    """A generation request with a bad field; the message names the field and the fix."""


class GenerationWarning(UserWarning):
    """Something about a generation its caller should hear of; the images are still returned."""


class PromptTruncated(GenerationWarning):
    """A prompt longer than the text encoder reads: its end has no effect on the image."""


class NonFiniteImage(GenerationWarning):
    """Images with NaN or infinite pixels (written black): the model's numbers overflowed."""


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise InvalidRequest(f"device {device!r} is not one of auto, cpu, cuda, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequest("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if device == "mps" and not _mps_available():
        raise InvalidRequest("device 'mps' was asked for but no Apple MPS device is available; use --device cpu")
    return torch.device(device)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def from_pil(images: list[Image.Image], width: int, height: int) -> torch.Tensor:
    """Images (transparent parts over white, resized to width x height) -> [B, 3, H, W] in [-1, 1]."""
    arrays = [np.asarray(flatten_on_white(im).resize((width, height), Image.LANCZOS), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def to_pil(samples: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB images."""
    arr = ((samples.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def _non_finite(finite: list[bool], seeds: list[int], loras: dict[str, float]) -> NonFiniteImage | None:
    """The warning for the images (by seed) that are not all finite, naming `loras` (name -> weight) as a cause."""
    bad = [seed for seed, ok in zip(seeds, finite) if not ok]
    if not bad:
        return None
    which = f"the image of seed {bad[0]}" if len(bad) == 1 else f"the images of seeds {', '.join(map(str, bad))}"
    cause = ("a numeric overflow in the model" if not loras else "the LoRAs' weights may be too strong "
             f"({', '.join(f'{n}:{w:g}' for n, w in loras.items())}): lower them")
    return NonFiniteImage(f"{which} came out with NaN or infinite pixels, drawn black: {cause}")


def image_geometry(metadata: dict[str, Any]) -> tuple[int, int]:
    """(the multiple every image side must be, the native side) from a checkpoint's metadata alone:
    the denoiser's patch size and sample size, times the VAE's downsampling for a latent model."""
    from .models.vae import downsample_factor

    config = metadata["config"]
    denoiser = config.get("denoiser", config)
    factor = downsample_factor(config["vae"]) if "vae" in config else 1
    return int(denoiser.get("patch_size", 1)) * factor, int(denoiser.get("sample_size", 64)) * factor


class Pipeline:
    """A denoiser, a text encoder and a decoder, with the defaults its checkpoint recommends."""

    def __init__(
        self,
        denoiser: torch.nn.Module,
        text_encoder: Any,
        metadata: dict,
        device: torch.device,
        name: str = "",
        decoder: torch.nn.Module | None = None,
        memory: str = "normal",
        cuda_graph: bool | None = None,
    ):
        """`decoder` maps denoised latents to images (None: the denoiser works in pixels).

        `cuda_graph`: replay the denoiser (and, in the normal memory mode, the text encoder's network)
        from CUDA graphs (bonsai.cuda_graph); None chooses automatically (BONSAI_CUDA_GRAPH=0/1 if set,
        else on for CUDA in the normal and lean memory modes)."""
        if memory not in MEMORY_MODES:
            raise InvalidRequest(f"memory {memory!r} is not one of {', '.join(MEMORY_MODES)}")
        settle_vml()  # else the same seed can give another image in one fresh process in a few dozen
        if device.type == "cpu":
            keep_large_blocks()  # large layer outputs reuse heap memory instead of fresh pages (bonsai/heap.py)
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.decoder = decoder
        self.metadata = metadata
        self.device = device
        self.memory = memory
        self.cuda_graph = cuda_graph
        try:
            use_cuda_graph(cuda_graph, device, memory)  # a bad BONSAI_CUDA_GRAPH fails here, not mid-generation
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        self._graphs: dict[str, GraphedModule] = {}  # part name -> its CUDA-graph replay
        self.lora_dir: str | None = None  # where `<lora:name:weight>` prompt tags find NAME.safetensors
        self.name = name or metadata.get("name", "")
        config = metadata["config"].get("denoiser", metadata["config"])
        pipe = metadata.get("pipeline", {})
        self.patch_size = config.get("patch_size", 1)
        self.channels = config.get("in_channels", 3)
        self.latent_factor = getattr(decoder, "factor", 1)  # pixels per latent along a side
        for part in (denoiser, text_encoder, decoder):
            if memory == "normal" and isinstance(part, torch.nn.Module):
                part.to(device)
        if decoder is not None and hasattr(decoder, "set_tiling"):
            decoder.set_tiling(memory != "normal")
        d = pipe.get("defaults", {})
        size = image_geometry(metadata)[1]  # the native side, as the server reads it from the header
        self.defaults = GenerationParams(
            prompt="",
            steps=d.get("steps", 20),
            cfg=d.get("cfg", 4.0),
            width=d.get("width", size),
            height=d.get("height", size),
            sampler=d.get("sampler", "euler"),
            shift=d.get("shift", 1.0),
            model=self.name,
        )

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike[str] = "bonsai-emoji", device: str = "auto", memory: str = "normal",
        cuda_graph: bool | None = None,
    ) -> "Pipeline":
        """Load a model by catalog name or file path (see `bonsai models list`). The checkpoint's
        metadata picks the text encoder and the decoder; `memory` is one of MEMORY_MODES;
        `cuda_graph` as in Pipeline()."""
        from .format import read_header
        from .hub import resolve
        from .models import load_model
        from .text import TextEncoder

        path = resolve(str(name_or_path))
        architecture = read_header(path).metadata["architecture"]
        if architecture.startswith("diffusers:"):  # before its weights load: this pipeline has no diffusers text encoder or VAE
            raise InvalidRequest(
                f"{path}: a 1-bit {architecture.removeprefix('diffusers:')} (from bonsai quantize or distill) generates "
                "through diffusers: bonsai.diffusers.load_bonsai_pipeline(path)"
            )
        dev = pick_device(device)
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        model, meta = load_model(path, device="cpu", dtype=dtype)
        pipe = meta.get("pipeline", {})
        text_kind, decoder_kind = pipe.get("text_encoder", "minilm"), pipe.get("decoder", "pixels")
        name = meta.get("name") or os.path.basename(str(path)).removesuffix(".safetensors")
        if meta["architecture"] == "bonsai-t2i":  # text encoder and VAE decoder are stored in the checkpoint
            if (text_kind, decoder_kind) != ("bert", "vae"):
                raise InvalidRequest(f"{path}: a bonsai-t2i model needs pipeline text_encoder 'bert' and decoder 'vae'")
            return cls(model.denoiser, model.text_encoder, meta, dev, name, model.decoder, memory, cuda_graph)
        if text_kind != "minilm" or decoder_kind != "pixels":
            raise InvalidRequest(f"{path}: text encoder {text_kind!r} / decoder {decoder_kind!r} is not supported by this Bonsai")
        return cls(model, TextEncoder(), meta, dev, name, None, memory, cuda_graph)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the denoiser's patch, in pixels."""
        return self.patch_size * self.latent_factor

    def check(self, params: GenerationParams, batch: int) -> None:
        """Raise InvalidRequest naming the first bad field."""
        factor = self.size_multiple
        if not params.prompt.strip():
            raise InvalidRequest("prompt is empty: describe the image you want")
        if len(params.prompt) > MAX_PROMPT_CHARS or len(params.negative_prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        for name, text in (("prompt", params.prompt), ("negative prompt", params.negative_prompt)):
            try:  # bytes a terminal sent in another encoding arrive as lone surrogates, which the tokenizer rejects
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidRequest(f"{name} is not UTF-8 text (character {e.start + 1} is an undecodable byte); retype it or use a UTF-8 terminal") from None
        if not 1 <= params.steps <= MAX_STEPS:
            raise InvalidRequest(f"steps must be between 1 and {MAX_STEPS}, got {params.steps}")
        if not CFG_RANGE[0] <= params.cfg <= CFG_RANGE[1]:
            raise InvalidRequest(f"cfg must be between {CFG_RANGE[0]:g} and {CFG_RANGE[1]:g}, got {params.cfg:g}")
        for side, value in (("width", params.width), ("height", params.height)):
            if not factor <= value <= MAX_SIDE or value % factor:
                raise InvalidRequest(
                    f"{side} {value} must be a multiple of {factor} between {factor} and {MAX_SIDE} for this model"
                )
        if params.sampler not in SAMPLERS:
            raise InvalidRequest(f"sampler {params.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if batch < 1:
            raise InvalidRequest(f"batch must be >= 1, got {batch}")
        if not 0 <= params.seed <= last_seed(batch):  # every image's seed is one a user can type back
            raise InvalidRequest(f"seed must be between 0 and {last_seed(batch)} for a batch of {batch}, got {params.seed}")
        if not 0 < params.strength <= 1:
            raise InvalidRequest(f"strength must be in (0, 1], got {params.strength:g}")

    def unread_text(self, text: str) -> str:
        """The end of `text` past the tokens the text encoder reads (it cuts the rest), or ''."""
        tokenizer = getattr(self.text_encoder, "tokenizer", None)
        if tokenizer is None or not text:
            return ""
        encoding = tokenizer.encode(text)
        if not encoding.overflowing:
            return ""
        return text[max(end for _, end in encoding.offsets):].strip(" \t\n,")

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.text_encoder.tokens(prompts)
        network = self.text_encoder.network
        if self.memory == "normal":  # one call per image: a graph pays only where it is kept between images
            network = self._replayed("text_encoder", network)
        if ids.device.type == "cpu":  # each distinct prompt alone, as in a batch of one (see per_sample)
            distinct, index = torch.unique(torch.cat([ids, mask.to(ids.dtype)], 1), dim=0, return_inverse=True)
            distinct_ids, distinct_mask = distinct.split(ids.shape[1], dim=1)
            states = per_sample(network, distinct_ids, distinct_mask.bool())[index]
        else:
            states = network(ids, mask)
        return states.to(self.device, self._dtype), mask.to(self.device)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def noise(self, params: GenerationParams, batch: int) -> torch.Tensor:
        """Per-image seeded noise [B, C, H, W], drawn on the CPU so every device gets the same."""
        shape = (self.channels, params.height // self.latent_factor, params.width // self.latent_factor)
        return seeded_noise(shape, [params.seed + i for i in range(batch)]).to(self.device, self._dtype)

    def encode_images(self, images: list[Image.Image], params: GenerationParams) -> torch.Tensor:
        """Init images -> the model's sample space [B, C, H, W] (pixels in [-1, 1] for pixel-space models)."""
        if self.decoder is not None:
            raise InvalidRequest("init images need a pixel-space model: this model's VAE has no encoder")
        return from_pil(images, params.width, params.height).to(self.device, self._dtype)

    @staticmethod
    def _prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
        """The prompt without its `<lora:name:weight>` tags, and the tags."""
        from .lora import LoRAError, parse_prompt_loras

        try:
            return parse_prompt_loras(prompt)
        except LoRAError as e:
            raise InvalidRequest(str(e)) from None

    @contextmanager
    def _use_loras(self, loras: list[tuple[str, float]]):
        """Inside the block the prompt's LoRAs are active (loaded from lora_dir if needed); afterwards
        their weights are back to what they were (0 for those the tags loaded). Tags thus act for one
        generation, and LoRAs attached with apply_lora keep the weights they were given."""
        from .lora import LoRAError, set_lora_weights, use_prompt_loras

        try:
            restore = use_prompt_loras(self.denoiser, loras, self.lora_dir) if loras else {}
        except LoRAError as e:
            raise InvalidRequest(str(e)) from None
        try:
            yield
        finally:
            set_lora_weights(self.denoiser, restore)

    def _active_loras(self) -> dict[str, float]:
        from .lora import loaded_loras

        return {name: w for name, w in loaded_loras(self.denoiser).items() if w}

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        batch: int = 1,
        callback: StepCallback | None = None,
        init_images: list[Image.Image] | None = None,
        **overrides: Any,
    ) -> Generation:
        """Generate `batch` images; unset fields take the model's defaults. seed=None draws one.

        With `init_images` (one per image, or one for all) and strength < 1 this is img2img: each
        init image is noised to t = strength and denoised from there."""
        fields_ = {k: v for k, v in overrides.items() if v is not None}
        if "seed" not in fields_:
            fields_["seed"] = secrets.randbelow(max(1, last_seed(batch) + 1))  # 0 .. the last seed check() allows
        params = replace(self.defaults, prompt=prompt, **fields_)
        self.check(params, batch)
        if init_images is not None and len(init_images) not in (1, batch):
            raise InvalidRequest(f"init_images holds {len(init_images)} images: give one for each of the {batch} images, or one for all")
        text, loras = self._prompt_loras(params.prompt)
        notes: list[GenerationWarning | None] = []
        for name, words in (("prompt", text), ("negative prompt", params.negative_prompt)):
            unread = self.unread_text(words)
            if unread:
                shown = unread if len(unread) <= 60 else unread[:57] + "..."
                notes.append(PromptTruncated(
                    f"the {name} is longer than the {self.text_encoder.max_tokens} tokens {self.name} reads: {shown!r} is ignored"
                ))
        timesteps = flow_timesteps(params.steps, params.shift)
        x = self.noise(params, batch)
        if init_images is not None:
            init = self.encode_images(init_images if len(init_images) == batch else init_images[:1] * batch, params)
            timesteps = img2img_timesteps(params.steps, params.strength, params.shift)
            if len(timesteps) < 2:
                raise InvalidRequest(f"strength {params.strength:g} leaves no step of {params.steps}: raise steps or strength")
            t0 = timesteps[0].item()
            x = (1 - t0) * init + t0 * x
        total = len(timesteps) - 1
        step_cb = None if callback is None else (lambda i, x_, x0: callback(i + 1, total, x0))
        with self._use_loras(loras):
            samples = self.sample([text] * batch, [params.negative_prompt] * batch, params, x, timesteps, step_cb)
            finite = torch.isfinite(samples).flatten(1).all(1).tolist()  # one check (one device sync) per batch
            active = {} if all(finite) else self._active_loras()  # walks every module: only when it is needed
        images = to_pil(samples)
        per_image = [replace(params, seed=params.seed + i) for i in range(batch)]
        notes.append(_non_finite(finite, [p.seed for p in per_image], active))
        notes = [n for n in notes if n is not None]
        for note in notes:
            warnings.warn(note, stacklevel=3)  # past torch.no_grad's wrapper: the caller's line
        for image, p in zip(images, per_image):
            image.info["parameters"] = p.to_a1111()
        return Generation(images, per_image, samples.float().cpu(), [str(n) for n in notes])

    def sample(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        params: GenerationParams,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """The core of every generation: encode one prompt (and negative prompt) per sample, denoise
        the starting samples x [B, C, h, w] along `timesteps` with guidance params.cfg and sampler
        params.sampler, and decode: images [B, 3, H, W] in [-1, 1]."""
        with self._placed(self.text_encoder):  # prompts and negative prompts in one batch (none without guidance)
            states, mask = self._encode(prompts + (negative_prompts if params.cfg != 1.0 else []))
        n = len(prompts)
        cond, uncond = (states[:n], mask[:n]), (states[n:], mask[n:])
        with self._placed(self.denoiser, offload_blocks=True):
            denoiser = self._replayed("denoiser", self.denoiser)  # with the weights in place: graphs check them
            model = cfg_velocity(denoiser, cond, uncond, params.cfg)
            try:
                samples = SAMPLERS[params.sampler](model, x, timesteps, callback)
            finally:
                if self.memory != "normal":  # the weights' device copies are freed on leaving _placed
                    self.release_cuda_graphs()
        return self.decode(samples)

    @property
    def cuda_graphs(self) -> GraphedModule | None:
        """The CUDA-graph wrapper of the current denoiser (its `stats` say what ran), if one was made."""
        graphs = self._graphs.get("denoiser")
        return graphs if graphs is not None and graphs.module is self.denoiser else None

    def release_cuda_graphs(self) -> None:
        """Free the captured graphs' memory; the next generation captures anew."""
        for graphs in self._graphs.values():
            graphs.reset()

    def _replayed(self, part: str, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """`module`, or its CUDA-graph replay where use_cuda_graph says so. Called with the weights in
        place, so the graphs are checked against the weights that will run."""
        if not use_cuda_graph(self.cuda_graph, self.device, self.memory):
            self._graphs.pop(part, None)
            return module
        graphs = self._graphs.get(part)
        if graphs is None or graphs.module is not module:  # first use, or the part was replaced
            graphs = self._graphs[part] = GraphedModule(module, name=part)
        graphs.sync()
        return graphs

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Denoised samples -> images [B, 3, H, W] in [-1, 1] (latents through the decoder)."""
        if self.decoder is None:
            return samples
        # 2.2x faster in bfloat16 at 512x512 on a CPU with bfloat16 arithmetic (bonsai.cpu_bf16)
        pixels = samples.shape[-2] * samples.shape[-1] * self.latent_factor**2
        bf16 = self.device.type == "cpu" and pixels >= DECODE_BF16_MIN_PIXELS and cpu_bf16.cpu_computes_bf16()
        with self._placed(self.decoder), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            images = self.decoder(samples.to(self.device))
        return images.float() if bf16 else images

    @contextmanager
    def _placed(self, module: Any, offload_blocks: bool = False):
        """Outside the normal memory mode, `module` occupies the device only inside this block
        (with offload_blocks in the offload mode, its `blocks` one at a time)."""
        if self.memory == "normal" or not isinstance(module, torch.nn.Module):
            yield
            return
        blocks = list(getattr(module, "blocks", ())) if offload_blocks and self.memory == "offload" else []
        with on_device(module, self.device, skip=blocks), sequential_offload(blocks, self.device):
            yield
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __call__(self, prompt: str, **kwargs: Any) -> list[Image.Image]:
        return self.generate(prompt, **kwargs).images
