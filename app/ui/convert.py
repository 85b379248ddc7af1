"""Convert page: a checkpoint in, an INT8 file ComfyUI loads out, with one button."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QLineEdit,
    QPushButton,
)

from app import system
from app.settings import Settings
from app.ui import theme
from app.ui.cards import Card, Facts, Notice, ResultCard
from app.ui.file_actions import show_in_folder
from app.ui.forms import Choices, action_row, attention_choice, form, primary_button
from app.ui.jobpanel import JobPanel
from app.ui.page import Page, require
from app.ui.path_fields import DropZone, PathField
from app.workers import Job
from engine.checkpoint import format_bytes
from engine.convert import ROTATION_SUFFIX, ConvertRequest, ConvertResult, run_convert
from engine.demo import DEMO_ARCH, DEMO_LABEL, build_demo_model
from engine.info import CheckpointInfo, inspect_checkpoint
from engine.library import SCHEME_LABELS
from engine.models import REGISTRY, Architecture

SCHEMES = {
    "rowwise": (
        "Row-wise (recommended)",
        (
            "One scale for each output row of a weight. Rows with large values no longer squeeze the "
            "others, so the result stays closer to the original. Costs a few KB per layer."
        ),
    ),
    "tensorwise": (
        "Tensor-wise",
        (
            "One scale for a whole weight: the simplest INT8 format. A few large rows make the rounding "
            "coarser for every other row, so quality can drop a little more."
        ),
    ),
}
ROTATIONS = {
    "none": ("Off (recommended)", "Plain INT8: the fastest, and every ComfyUI INT8 loader reads it."),
    "down": (
        "Down-projections",
        "Hadamard-rotates the layers after each MLP activation: lower error, ~7% slower. Needs a "
        "ComfyUI that reads 'convrot'.",
    ),
    "all": (
        "All layers",
        "Rotates every layer it can: the lowest error, ~9% slower. Needs a ComfyUI that reads 'convrot'.",
    ),
}
KEEP_HELP = (
    "Layers kept in high precision stay in the source's bf16/fp16. The recommended set keeps the "
    "embedders, the final layer and the modulation layers: they are small, sensitive to rounding, and "
    "no faster in int8. Keeping more layers means a bigger file and a smaller speed-up."
)


class ConvertPage(Page):
    key, title, icon_name = "convert", "Convert", "convert"
    subtitle = "From a bf16 or fp8 checkpoint to an INT8 file that ComfyUI loads as it is."

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.info: CheckpointInfo | None = None
        self._inspecting: Job | None = None

        self.demo_offer = Notice(
            f"No model yet? Try the built-in demo: a small model with the real {DEMO_LABEL} layout "
            "that converts, benchmarks and merges in seconds on any computer."
        )
        self.demo_button = QPushButton("Use the demo model")
        theme.bind_icon(self.demo_button, "sparkle", "accent")
        self.demo_button.clicked.connect(self.use_demo)
        self.demo_offer.actions.addWidget(self.demo_button)
        self.demo_offer.setVisible(not settings.recent_files)
        self.demo_panel = JobPanel()

        source = Card("Source", icon_name="file")
        self.drop_zone = DropZone(
            "Drop a .safetensors file or a diffusers folder anywhere on this card"
        )
        self.drop_zone.dropped.connect(self.open_path)
        self.source = PathField("model", "Drop a checkpoint here, or browse")
        self.source.setAccessibleName("Source checkpoint")
        self.source.setToolTip("bf16, fp16, fp32 or fp8 checkpoints; diffusers folders work too.")
        self.source.set_history(settings.recent_files)
        self.source.start_dir = settings.last_folder
        self.source.changed.connect(self._inspect)
        self.drop_zone.layout().addWidget(self.source)
        self.facts = Facts(columns=2)
        self.source_problem = Notice("", "warning")
        self.source_problem.hide()
        source.body.addWidget(self.drop_zone)
        source.body.addWidget(self.facts)
        source.body.addWidget(self.source_problem)

        options = Card("INT8 options", icon_name="settings")
        fields = form()
        self.schemes = Choices(SCHEMES, "Weight scales")
        self.schemes.changed.connect(lambda _: self._suggest_output())
        fields.addRow("Scales", self.schemes)
        self.rotations = Choices(ROTATIONS, "Hadamard rotation")
        self.rotations.changed.connect(lambda _: self._suggest_output())
        fields.addRow("Rotation", self.rotations)
        self.attention = attention_choice()
        fields.addRow("Attention", self.attention)

        self.keep_preset = QComboBox()
        self.keep_preset.setAccessibleName("Layers kept in high precision")
        self.keep_preset.setToolTip(KEEP_HELP)
        self.keep_preset.addItem("Recommended for this model", "recommended")
        self.keep_preset.addItem("Safer: also keep the first block of each stack", "first-blocks")
        self.keep_preset.addItem("Custom patterns", "custom")
        self.keep_preset.currentIndexChanged.connect(self._on_preset)
        self.keep_patterns = QLineEdit()
        self._suggest_patterns(REGISTRY[DEMO_ARCH])
        self.keep_patterns.setAccessibleName("Custom patterns of layers to keep")
        self.keep_patterns.setToolTip(
            "Layer names to keep in high precision, separated by spaces; * matches anything. "
            "Names are the ComfyUI ones, without the diffusion_model. prefix."
        )
        self.keep_patterns.hide()
        fields.addRow("Keep high precision", self.keep_preset)
        fields.addRow("", self.keep_patterns)
        self.cast_float32 = QCheckBox("Store float32 leftovers as bf16")
        self.cast_float32.setToolTip(
            "Some checkpoints keep norms and biases in float32. bf16 halves their size; ComfyUI "
            "computes in bf16 anyway, so nothing visible changes."
        )
        fields.addRow("", self.cast_float32)
        options.body.addLayout(fields)

        output = Card("Output", icon_name="export")
        self.output = PathField("save", "")
        self.output.setAccessibleName("Output file")
        self.output.setToolTip(
            "Leave empty to save next to the source. Written to a temporary file first, then "
            "renamed: never half a file."
        )
        self.output.changed.connect(lambda _: self._forget_result())
        self._suggest_output()
        self.convert_button = primary_button("Convert to INT8", "convert")
        self.convert_button.clicked.connect(self.convert)
        self.panel = JobPanel()
        output.body.addWidget(self.output)
        output.body.addLayout(action_row(self.convert_button))
        output.body.addWidget(self.panel)

        self.result_card = ResultCard(
            [
                ("Show in folder", "folder", lambda: show_in_folder(self.result.output)),
                (
                    "Export to ComfyUI",
                    "export",
                    lambda: self.send.emit("export", self.result.output),
                ),
                (
                    "Benchmark it",
                    "benchmark",
                    lambda: self.send.emit("benchmark", self.result.output),
                ),
                ("Merge LoRAs into it", "lora", lambda: self.send.emit("lora", self.result.output)),
            ]
        )
        self.result: ConvertResult | None = None

        self.add(
            self.demo_offer,
            self.demo_panel,
            source,
            options,
            output,
            self.result_card,
            stretch=True,
        )
        self.update_ready()

    # --- source ----------------------------------------------------------------------------------

    def open_path(self, path: Path) -> bool:
        self.source.set_path(path)
        return True

    def use_demo(self) -> Job:
        """Build the built-in demo model (once) and take it as the source."""
        job = Job("Preparing the demo model", build_demo_model, self.settings.cache_dir() / "demo")
        job.succeeded.connect(lambda path: self.open_path(Path(path)))
        return self.demo_panel.run(job, lambda path: f"The demo model is ready: {path}")

    def _forget_result(self) -> None:
        """The last conversion's result and outcome belong to the input it had: gone when that changes."""
        self.result_card.hide()
        self.panel.clear()

    def _inspect(self, path: Path | None) -> None:
        self.info = None
        self.facts.show_facts([])
        self.source_problem.hide()
        self._forget_result()
        self.update_ready()
        if path is None:
            return
        self.demo_offer.hide()
        self._inspecting = job = Job.call("Reading the checkpoint", inspect_checkpoint, path)
        job.succeeded.connect(lambda info: self._on_inspected(job, info))
        job.failed.connect(lambda error: self._on_inspect_failed(job, str(error)))
        job.crashed.connect(lambda summary, _: self._on_inspect_failed(job, summary))
        job.start(self)

    def _on_inspected(self, job: Job, info: CheckpointInfo) -> None:
        if job is not self._inspecting:
            return  # the user picked another file meanwhile
        self.info = info
        if info.architecture:
            self._suggest_patterns(REGISTRY[info.architecture])
        facts = [
            ("Model", info.model or "not recognised"),
            ("Layout", info.layout or "—"),
            ("Weights", info.weight_format or "—"),
            (
                "Size",
                f"{format_bytes(info.size)} in {len(info.files)} file(s), {info.tensors} tensors",
            ),
        ]
        self.facts.show_facts(facts)
        if info.problem:
            self._show_problem(info.problem)
        elif info.weight_format and info.weight_format.startswith("int8"):
            self._show_problem(
                "This file is already INT8. Convert the original bf16 or fp8 checkpoint instead, or "
                "send this one to Export or LoRA."
            )
        else:
            self.settings.add_recent(info.path)
            self.source.set_history(self.settings.recent_files)
        self.update_ready()

    def _on_inspect_failed(self, job: Job, message: str) -> None:
        if job is self._inspecting:
            self._show_problem(message)

    def _show_problem(self, message: str) -> None:
        self.source_problem.set(message, "warning")
        self.source_problem.show()

    # --- options ---------------------------------------------------------------------------------

    def scheme(self) -> str:
        return self.schemes.value()

    def keep(self) -> tuple[str, ...]:
        preset = self.keep_preset.currentData()
        if preset == "first-blocks" and self.info and self.info.architecture:
            return REGISTRY[self.info.architecture].first_blocks
        if preset == "custom":
            return tuple(self.keep_patterns.text().replace(",", " ").split())
        return ()

    def _on_preset(self) -> None:
        self.keep_patterns.setVisible(self.keep_preset.currentData() == "custom")

    def _suggest_patterns(self, arch: Architecture) -> None:
        """The custom patterns' example: this architecture's layer names."""
        self.keep_patterns.setPlaceholderText("e.g. " + "  ".join(arch.first_blocks))

    def _suggest_output(self) -> None:
        self.output.combo.lineEdit().setPlaceholderText(
            f"Automatic: next to the source, as …-int8-{self.scheme()}"
            f"{ROTATION_SUFFIX[self.rotations.value()]}.safetensors"
        )

    def update_ready(self) -> None:
        source = bool(self.info and self.info.model and not self.source_problem.isVisible())
        require(
            self.convert_button,
            [("a supported source checkpoint", source)],
            "Convert with the options above.",
            self.panel.running,
        )

    # --- convert ---------------------------------------------------------------------------------

    def request(self) -> ConvertRequest:
        return ConvertRequest(
            source=self.source.path(),
            output=self.output.path(),
            scheme=self.scheme(),
            rotate=self.rotations.value(),
            attention=self.attention.currentData(),
            keep=self.keep(),
            cast_float32_to_bf16=self.cast_float32.isChecked(),
            device=system.device(self.settings.gpu_index),
        )

    def convert(self) -> Job:
        self.result_card.hide()
        return self.start(
            "Converting", run_convert, self.request(), self.panel, self.convert_button, self._on_converted
        )

    def _on_converted(self, result: ConvertResult) -> None:
        self.result = result
        ratio = result.bytes_out / result.bytes_in if result.bytes_in else 0
        scheme = SCHEME_LABELS[result.scheme]
        text = f"Saved {result.model} as INT8 with {scheme} scales."
        sizes = f"{format_bytes(result.bytes_in)} → {format_bytes(result.bytes_out)} ({ratio:.0%})"
        facts = [
            ("File", str(result.output)),
            ("Size", sizes),
            ("Layers in INT8", f"{result.quantized}" + (f", {result.rotated} rotated" if result.rotated else "")),
            ("Kept in high precision", f"{result.kept} tensors"),
        ]
        if result.left_out:
            facts.append(("Left out", f"{result.left_out} tensors outside the diffusion model"))
        self.result_card.show_result(text, facts)
        self.reveal(self.result_card)
