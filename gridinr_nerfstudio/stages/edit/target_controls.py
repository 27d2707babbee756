"""The edit's targets in nerfstudio's viser viewer: listed, added, removed and retargeted while training runs.

One folder per target slot ("Edit targets/Target n"): what the part should look like (a prompt, colours, a palette
or image file), its value range (a two-handled slider, normalised values), negative prompts and weight, and a
button that removes it; "Add target" opens the next free slot. A change applies to the model at once (nerfstudio
runs our callbacks under the training lock and re-renders): the next training step scores the new target and the
next frame shows the part's current look. Slots are fixed (`--pipeline.model.max-targets`): hidden while free.

nerfstudio finds viewer elements among the model's attributes and makes a folder of every `nn.Module` on the way
(`viewer/utils.py: parse_object`), so the folders here are empty modules holding elements; they hold no reference
back to the model (the callbacks close over it), which would make that search loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerDropdown,
    ViewerNumber,
    ViewerParameter,
    ViewerText,
)
from torch import nn

from gridinr_nerfstudio.stages.edit.color_loss import resolve_palette
from gridinr_nerfstudio.stages.edit.targets import EditTarget, TargetError, check_target, normalized_range

KINDS = ("prompt", "colors", "palette", "image")


class ViewerRangeSlider(ViewerParameter[Tuple[float, float]]):
    """A slider with two handles (viser's multi slider), for a value range [low, high]."""

    def __init__(self, name: str, default_value: Tuple[float, float], min_value: float = 0.0,
                 max_value: float = 1.0, step: float = 0.01, min_range: float = 0.01,
                 cb_hook: Callable = lambda element: None, visible: bool = True, hint: Optional[str] = None):
        super().__init__(name, tuple(default_value), visible=visible, cb_hook=cb_hook)
        self.min, self.max, self.step, self.min_range, self.hint = min_value, max_value, step, min_range, hint

    def _create_gui_handle(self, viser_server) -> None:
        self.gui_handle = viser_server.gui.add_multi_slider(
            self.name, min=self.min, max=self.max, step=self.step, initial_value=tuple(self.default_value),
            min_range=self.min_range, visible=self.visible, hint=self.hint)


class ControlFolder(nn.Module):
    """An empty module: nerfstudio's viewer shows the elements among its attributes in a folder of its name."""


def _show(element, visible: bool) -> None:
    if element.gui_handle is None:
        element.visible = visible
    else:
        element.set_hidden(not visible)


class TargetSlotControls:
    """The controls of one target slot and what turns their values into an `EditTarget`."""

    def __init__(self, model, slot: int, status: ViewerText):
        self.model, self.slot, self.status = model, slot, status
        self.folder = ControlFolder()
        apply = lambda element: self.apply()  # noqa: E731
        elements = {
            "a_kind": ViewerDropdown("Kind", "prompt", list(KINDS), cb_hook=apply, hint="what the part should look like"),
            "b_text": ViewerText("Prompt / colours / file", "", cb_hook=apply,
                                 hint="a prompt; colours '#1f77b4, teal'; or a palette/image file path"),
            "c_range": ViewerRangeSlider("Range (normalised)", (0.0, 1.0), cb_hook=apply),
            "d_negative": ViewerText("Negative prompts", "", cb_hook=apply, hint="comma-separated; need CLIP"),
            "e_weight": ViewerNumber("Weight", 1.0, cb_hook=apply),
            "f_remove": ViewerButton("Remove target", cb_hook=lambda element: self.remove()),
        }
        for name, element in elements.items():
            element.visible = False
            self.folder.__dict__[name] = element
        self.elements = elements
        self.open = False  # shown in the viewer (a target, or a slot the user is filling in)

    def show(self, visible: bool) -> None:
        self.open = visible
        for element in self.elements.values():
            _show(element, visible)

    def fill(self, target: EditTarget) -> None:
        """Set the controls from a target (no callbacks: the values describe the model already)."""
        if target.kind == "color":
            kind = "palette" if target.palette is not None else "colors"
            text = str(target.palette) if target.palette is not None else ", ".join(str(c) for c in target.colors or [])
        else:
            kind = "image" if target.image is not None else "prompt"
            text = str(target.image) if target.image is not None else target.prompt or ""
        values = {"a_kind": kind, "b_text": text, "c_range": (round(target.low, 4), round(target.high, 4)),
                  "d_negative": ", ".join(target.negative), "e_weight": target.weight}
        for name, value in values.items():
            element = self.elements[name]
            hook, element.cb_hook = element.cb_hook, lambda element: None
            element.value = value
            element.cb_hook = hook
        self.show(True)

    def target(self) -> Optional[EditTarget]:
        """The target the controls describe, or None while its text is empty; TargetError when it cannot work."""
        kind, text = self.elements["a_kind"].value, self.elements["b_text"].value.strip()
        if not text:
            return None
        low, high = normalized_range(list(self.elements["c_range"].value), False, 0.0, 1.0, f"target {self.slot + 1}")
        negative = [part.strip() for part in self.elements["d_negative"].value.split(",") if part.strip()]
        weight = float(self.elements["e_weight"].value)
        if not weight >= 0:
            raise TargetError(f"target {self.slot + 1}: weight must be >= 0, got {weight}")
        current = self.model.targets[self.slot]
        target = EditTarget(low=low, high=high, softness=current.softness if current else 0.0, negative=negative,
                            weight=weight, negative_weight=current.negative_weight if current else 0.5)
        if kind == "prompt":
            target.prompt = text
        elif kind == "colors":
            target.colors = [part.strip() for part in text.split(",") if part.strip()]
        elif kind == "palette":
            target.palette = resolve_palette(Path(text).expanduser())
        else:
            target.image = Path(text).expanduser()
        check_target(target, f"target {self.slot + 1}")
        return target

    def apply(self) -> None:
        """Retarget the slot from its controls; problems go to the status line, and the model keeps its target."""
        try:
            target = self.target()
        except (TargetError, ValueError) as error:
            self.status.value = " ".join(str(error).split())
            return
        if target is None:
            return
        if target.needs_clip:
            reason = self.model.request_clip()
            if reason is not None:
                self.status.value = f"target {self.slot + 1} needs CLIP weights: {reason}"[:400]
                return
        self.model.set_target(self.slot, target)
        note = self.model.target_notes.get(self.slot)
        self.status.value = note or f"target {self.slot + 1}: {target.label} on [{target.low:.3g}, {target.high:.3g}]"

    def remove(self) -> None:
        if self.model.targets[self.slot] is not None:
            self.model.remove_target(self.slot)
        self.show(False)
        self.status.value = f"target {self.slot + 1} removed"


class TargetControls(ControlFolder):
    """The "Edit targets" folder: an add button, a status line and one folder per slot."""

    def __init__(self, model):
        super().__init__()
        self.__dict__["Status"] = ViewerText("Status", "", disabled=True)
        self.__dict__["slots"]: List[TargetSlotControls] = [
            TargetSlotControls(model, slot, self.Status) for slot in range(model.config.max_targets)]
        self.__dict__["Add target"] = ViewerButton("Add target", cb_hook=lambda element: self.add())
        for slot in self.slots:
            self.__dict__[f"Target {slot.slot + 1}"] = slot.folder
        self.__dict__["model_targets"] = lambda: model.targets  # a function, not the model (see module docstring)
        self.refresh()

    def add(self) -> Optional[int]:
        """Open the first slot that holds no target and is not being filled in; returns it."""
        targets = self.model_targets()
        for slot in self.slots:
            if targets[slot.slot] is None and not slot.open:
                slot.show(True)
                self.Status.value = f"target {slot.slot + 1}: choose its kind, text and range"
                return slot.slot
        self.Status.value = "every target slot is in use (--pipeline.model.max-targets)"
        return None

    def refresh(self) -> None:
        """Show the model's targets (after a checkpoint brought its own)."""
        for slot, target in zip(self.slots, self.model_targets()):
            if target is not None:
                slot.fill(target)
            else:
                slot.show(False)


FOLDER = "Edit targets"
"""The model attribute (and viewer folder) holding the target controls."""


def target_controls(model: Any) -> TargetControls:
    return TargetControls(model)
