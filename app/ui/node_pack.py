"""The INT8 Studio nodes in a ComfyUI install (Export page): a status line and one button.

"INT8 Studio nodes: not installed" → **Install nodes**; "update available (installed v…)" → **Update
nodes**; "installed v…" → **Remove nodes** (asks first). The jobs are the engine's
(:mod:`engine.node_pack`, the same as ``int8-studio comfyui install-node / remove-node``); a package
install into ComfyUI's Python shows its exact command and every line of its output below.
"""

from __future__ import annotations

from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.ui import dialogs, theme
from app.ui.cards import Notice
from app.ui.jobpanel import JobPanel
from app.workers import Job
from engine.comfyui import ComfyInstall
from engine.jobs import Progress
from engine.node_pack import (
    PACKAGES_STAGE,
    NodePackRequest,
    NodePackResult,
    run_install_node,
    run_remove_node,
)
from engine.node_pack_status import PackStatus, node_pack_status


class NodePackRow(QWidget):
    """Status and the one action of the INT8 Studio nodes in the install given to :meth:`show_install`."""

    def __init__(self) -> None:
        super().__init__()
        self.install: ComfyInstall | None = None
        self.status: PackStatus | None = None
        self.result: NodePackResult | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(8)
        row = QHBoxLayout()
        self.label = QLabel("INT8 Studio nodes: choose a ComfyUI install")
        self.label.setAccessibleName("INT8 Studio nodes status")
        self.label.setWordWrap(True)
        self.button = QPushButton("Install nodes")
        self.button.setAccessibleName("INT8 Studio nodes action")
        theme.bind_icon(self.button, "comfyui")
        self.button.setEnabled(False)
        self.button.clicked.connect(self.act)
        row.addWidget(self.label, 1)
        row.addWidget(self.button)
        self.panel = JobPanel()
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setAccessibleName("Package install output")
        self.log.setMaximumHeight(140)
        self.log.hide()
        self.notice = Notice("", "success")
        self.notice.hide()
        layout.addLayout(row)
        layout.addWidget(self.panel)
        layout.addWidget(self.log)
        layout.addWidget(self.notice)

    def show_install(self, install: ComfyInstall | None) -> Job | None:
        """Read the nodes' status in ``install`` (off the GUI thread)."""
        self.install, self.status = install, None
        self.button.setEnabled(False)
        if install is None:
            self.label.setText("INT8 Studio nodes: choose a ComfyUI install")
            return None
        self.label.setText("INT8 Studio nodes: checking…")
        job = Job.call("Checking the INT8 Studio nodes", node_pack_status, install)
        job.succeeded.connect(lambda status: self._on_status(install, status))
        dialogs.report_errors(job, self)
        return job.start(self)

    def _on_status(self, install: ComfyInstall, status: PackStatus) -> None:
        if install is not self.install:
            return
        self.status = status
        self.label.setText(status.summary)
        self.label.setToolTip(str(status.folder))
        action = "Remove" if status.state == "installed" else status.action
        self.button.setText(f"{action} nodes")
        self.button.setToolTip(
            {
                "Install": "Copy the INT8 Studio nodes into ComfyUI's custom_nodes folder (and Triton into "
                "ComfyUI's Python if it lacks it). Restart ComfyUI afterwards.",
                "Update": "Replace the installed nodes with this INT8 Studio's, once the new ones are verified.",
                "Remove": "Delete custom_nodes/int8_studio (nothing else). Restart ComfyUI afterwards.",
            }[action]
        )
        self.button.setEnabled(status.state != "not ours" and not self.panel.running)

    def act(self) -> Job | None:
        """The button: install or update, or (asked first) remove."""
        if self.install is None or self.status is None:
            return None
        if self.status.state != "installed":
            return self.install_nodes()
        dialogs.ask(
            self, "Remove the INT8 Studio nodes",
            f"Remove the INT8 Studio nodes from {self.status.folder}? Workflows that use them will need "
            "them again.", "Remove", "Keep", self.remove_nodes,
        )  # fmt: skip
        return None

    def install_nodes(self) -> Job:
        lines: list[str] = []  # every line of a package install (the panel shows only the latest)

        def install(request: NodePackRequest, progress, cancel) -> NodePackResult:
            def report(p: Progress) -> None:
                if p.stage == PACKAGES_STAGE and p.message:
                    lines.append(p.message)
                progress(p)

            return run_install_node(request, progress=report, cancel=cancel)

        self.log.clear()
        job = Job("Installing the INT8 Studio nodes", install, NodePackRequest(self.install))
        job.progress.connect(lambda _: self._show_lines(lines))
        job.finished.connect(lambda: self._show_lines(lines))
        return self._run(job)

    def remove_nodes(self) -> Job:
        self.log.clear()
        self.log.hide()
        return self._run(Job("Removing the INT8 Studio nodes", run_remove_node, NodePackRequest(self.install)))

    def _run(self, job: Job) -> Job:
        install = self.install
        self.notice.hide()
        self.button.setEnabled(False)
        job.succeeded.connect(self._on_done)
        job.finished.connect(lambda: self.show_install(install) if install is self.install else None)
        return self.panel.run(job, summary=lambda result: "Done.")

    def _show_lines(self, lines: list[str]) -> None:
        shown = self.log.blockCount() if self.log.toPlainText() else 0
        for line in lines[shown:]:
            self.log.appendPlainText(line)
        self.log.setVisible(bool(lines))

    def _on_done(self, result: NodePackResult) -> None:
        self.result = result
        text = result.summary[0].upper() + result.summary[1:] + "."
        if result.commands:
            text += " Installed into ComfyUI's Python with: " + "; ".join(result.commands)
        self.notice.set(text, "success")
        self.notice.show()
