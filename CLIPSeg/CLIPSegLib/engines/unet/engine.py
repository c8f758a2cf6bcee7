"""A fixed-vocabulary MONAI 2D UNet behind the engine contract: one sigmoid output channel per finding it was trained
for. MedCLIP-SAM's weakly supervised stage (``training.pseudo_labels``, v2's recipe with MONAI in place of nnU-Net)
trains one on the zero-shot masks of unlabelled volumes.

The network reads no free text: a prompt selects the output of the finding whose phrasing shares the largest share
of its words with the prompt (case and punctuation aside; the reading names the finding, and words no phrasing holds
are reported as unseen); a prompt sharing no word with any phrasing is an error naming them. Its prompt "embedding"
is the one-hot vector of that finding, so two phrasings of one finding have cosine 1 and the pipeline's rule
matching (``pipeline.presence_rules``) finds the finding's own rule.

A model spec of engine ``unet`` holds ``network`` (MONAI ``UNet`` arguments: channels, strides, num_res_units, norm),
``findings`` (finding -> its phrasings; the order is the channel order), ``input_size`` (pixels) and the files'
``unet.*`` tensors, plus the pipeline's ``presence`` rule.
"""

from __future__ import annotations

import torch

from ...errors import InputError, ModelError
from ...models import load_weights
from ..contract import Engine, Preprocessing, PromptReading, PromptState, prompt_words

MAX_WORDS = 16  # words of a prompt read (a longer prompt is cut, and says so)
# batch norm, not MONAI's default instance norm: instance norm rescales each slice on its own, so a slice of plain
# tissue looks as contrasted as one with a finding and the network cannot leave it empty
NETWORK = {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2, "norm": "batch"}


def build_unet(n_findings: int, network: dict | None = None):
    """MONAI 2D ``UNet``: ``[B,1,S,S]`` -> logits ``[B,n_findings,S,S]`` (S divisible by the product of strides)."""
    from monai.networks.nets import UNet

    cfg = {**NETWORK, **(network or {})}
    unknown = sorted(set(cfg) - set(NETWORK))
    if unknown:
        raise ModelError(f"unet network {unknown!r} is not understood; it may hold {', '.join(NETWORK)}")
    return UNet(spatial_dims=2, in_channels=1, out_channels=n_findings, channels=tuple(cfg["channels"]),
                strides=tuple(cfg["strides"]), num_res_units=int(cfg["num_res_units"]), norm=cfg["norm"])


def check_findings(spec: dict) -> dict:
    findings = spec.get("findings")
    if (not isinstance(findings, dict) or not findings
            or not all(isinstance(p, list) and p and all(isinstance(t, str) for t in p) for p in findings.values())):
        raise ModelError(f"model {spec.get('id')!r}: 'findings' must map each finding to a non-empty list of its "
                         f"phrasings (its output channel order), got {findings!r}; re-export the model")
    return findings


class UNetEngine(Engine):
    name = "unet"

    def __init__(self, net, findings: dict, device, spec: dict | None = None, precision: str = "fp32"):
        spec = spec or {}
        super().__init__(spec, device, precision,
                         Preprocessing.from_spec(spec, int(spec.get("input_size", 128)), fit="pad"))
        self.net = net.to(self.device).eval()
        self.findings, self.phrasings = list(findings), findings
        self.channel = {tuple(prompt_words(p)): i for i, f in enumerate(self.findings) for p in findings[f]}

    @classmethod
    def from_spec(cls, spec: dict, device: torch.device, precision: str = "fp32") -> "UNetEngine":
        findings = check_findings(spec)
        net = build_unet(len(findings), spec.get("network"))
        state = {k[5:]: v.float() for k, v in load_weights(spec).items() if k.startswith("unet.")}
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ModelError(f"model {spec['id']!r}: its unet.* tensors do not fit its network entry ({e}); "
                             f"re-export the model") from e
        return cls(net, findings, device, spec, precision)

    def finding_of(self, words: tuple[str, ...]) -> int | None:
        """The channel of the finding with a phrasing that shares the largest share of its words with ``words``
        (first finding on a tie); None when no phrasing shares a word."""
        best, best_score = None, 0.0
        for phrase, channel in self.channel.items():
            score = len(set(phrase) & set(words)) / len(set(phrase))
            if score > best_score:
                best, best_score = channel, score
        return best

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[PromptReading]]:
        """One-hot ``[N,F]`` of the finding each text selects (its first ``MAX_WORDS`` words: ``finding_of``); a
        text that shares no word with any phrasing is an InputError listing them."""
        rows, readings = [], []
        for text in texts:
            words = tuple(prompt_words(text))
            kept = words[:MAX_WORDS]
            channel = self.finding_of(kept)
            if channel is None:
                known = "; ".join(f"{f}: {', '.join(repr(p) for p in self.phrasings[f])}" for f in self.findings)
                raise InputError(f"model {self.spec.get('id')!r} has one output per finding it was trained on and "
                                 f"matches a prompt to them by its words: {text!r} shares no word with any of its "
                                 f"phrasings ({known}). Use one of them, or a text-guided model for other findings")
            rows.append(channel)
            readings.append(PromptReading(text, kept, len(words) > len(kept), " ".join(kept),
                                          finding=self.findings[channel]))
        onehot = torch.zeros(len(texts), len(self.findings), device=self.device)
        onehot[torch.arange(len(texts)), torch.tensor(rows)] = 1.0
        return onehot, readings

    def infer(self, slices: torch.Tensor, state: PromptState):
        """Slices ``[B,1,S,S]`` -> (sigmoid of the prompts' channels ``[B,P,S,S]``, None: no slice presence)."""
        channels = state.embeddings.argmax(1).to(self.device)
        with self.autocast():
            logits = self.runner(self.net)(slices.to(self.device, torch.float32))
        return torch.sigmoid(logits.float()[:, channels]), None


__all__ = ["UNetEngine", "MAX_WORDS", "NETWORK", "build_unet", "check_findings"]
