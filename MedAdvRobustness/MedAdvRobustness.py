"""3D Slicer module: probe a segmentation network with adversarial attacks or MRI corruptions, results in the scene.

All computation lives in MedAdvRobustnessLib (imported lazily: it needs torch and MONAI). The widget binds the
.ui to a parameter node; Apply hands that node to ``MedAdvRobustnessLib.module.logic.start_run`` (worker process),
a timer polls its progress, and the results are added on the main thread when it is done. The packages the
features need are listed in ``MedAdvRobustnessLib.module.dependencies`` (standard library only).
"""
import importlib
import json
import logging
import os
import tempfile
import unittest
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
SAMPLE_DIR = os.path.join(MODULE_DIR, "MedAdvRobustnessLib", "Resources", "Sample")
# Sample Data: (name, file in SAMPLE_DIR, file type, load properties, checksum). The checksum makes Sample Data
# replace a cached copy that differs; "labelmap" makes the volume reader create a vtkMRMLLabelMapVolumeNode.
SAMPLE_DATA = (
    ("MNI152 T1 2 mm (MedAdvRobustness)", "MNI152_T1_2mm.nii.gz", "VolumeFile", {},
     "SHA256:b5d2bb64c32ff0835247090c974ab8ccfb4a9eb813bb7821758931cf57dcbcf8"),
    ("MNI152 tissue labels 2 mm (MedAdvRobustness)", "MNI152_tissue_2mm.nii.gz", "VolumeFile", {"labelmap": True},
     "SHA256:a74a005856f05cd6f8a13aefed5b7147cd196b0daa5ca8f5ba93ab6d5c1c352e"),
)
TORCH_REQUIREMENT = ">=2.1"  # what the PyTorch extension is asked for (MedAdvRobustnessLib.module.dependencies)
NETWORK_KINDS = ["builtin", "torchscript", "bundle", "description", "nnunet"]
BUILTIN_NETWORKS = ["demo", "demo-classifier"]
COMPARE_NETWORKS = ["demo-unet", "demo-unet-short", "demo-segresnet", "demo-attentionunet", "demo-slicewise2d"]
OUTPUT_ACTIVATIONS = ["auto", "logits", "softmax", "sigmoid"]
DEVICES = ["cpu", "cuda"]
POLL_MILLISECONDS = 200


#
# MedAdvRobustness
#


class MedAdvRobustness(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedAdvRobustness")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedAdvRobustness developers (MedAdvRobustness)"]
        self.parent.helpText = _("""
Probes a segmentation network or a classifier (the built-in demos, a TorchScript file, a MONAI bundle or a
model.json with an architecture and a checkpoint) on the selected volume, one-slice image or colour image with an
adversarial attack (FGSM, PGD, SegPGD, CosPGD, APGD, DAG; DeepFool and JSMA for classifiers) at several epsilons or
an MRI corruption at several severities, and adds to a new folder of the scene the perturbed volumes, the
perturbations, the clean and attacked segmentations, a metrics table and the Dice curve (for a classifier: the
saliency map, the predicted class per strength and the confidence curve; the status names the class).
Compare networks runs the selected probe and further ones, once per seed, on several networks and volumes: a
summary table, a Dice chart per probe and an instability map per network and volume combining the probes.
See the <a href="https://github.com/medadvrobustness/SlicerMedAdvRobustness">project page</a>.
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer, PyTorch and MONAI. The embedded sample is derived from the MNI ICBM152 2009 template
(Fonov et al., NeuroImage 2009, 2011).
""")
        if hasattr(slicer, "app"):  # only inside the Slicer application
            slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Add the embedded MNI152 sample (T1 and tissue labels) to the Sample Data module, with their checksums and
    file types (``loadFileTypes``: Slicer 5.8 and later)."""
    import SampleData

    icon = os.path.join(MODULE_DIR, "Resources", "Icons", "MedAdvRobustness.png")
    for name, fileName, fileType, properties, checksum in SAMPLE_DATA:
        path = os.path.join(SAMPLE_DIR, fileName)
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="MedAdvRobustness", sampleName=name, thumbnailFileName=icon,
            uris=qt.QUrl.fromLocalFile(path).toString(), fileNames=fileName, nodeNames=fileName.split(".")[0],
            checksums=checksum, loadFileTypes=fileType, loadFileProperties=properties)


#
# MedAdvRobustnessParameterNode
#


@parameterNodeWrapper
class MedAdvRobustnessParameterNode:
    """The module's settings (MedAdvRobustnessLib.module.logic.ProbeSettings reads the same parameters).

    referenceNode - optional label map or segmentation; referenceSegmentIds - its segments (comma-separated).
    trueClass - a classifier's optional true class index (text; empty: the clean prediction).
    probeParameters - JSON {probe: {parameter: value}}: each probe keeps its own settings.
    regionSegmentation, regionSegmentId - optional segment that bounds the perturbation (or the corruption).
    compareNetworks - the checked networks of "Compare networks" (comma-separated). Its volumes are node references
    under the role ``compareVolumes``, kept by the widget (the wrapper has no list-of-nodes widget binding).
    compareProbes - further probes compared besides the selected one (comma-separated); compareSeeds - the seeds
    each compared probe runs with ("0 1 2"; empty: its own seed).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    referenceNode: vtkMRMLNode
    referenceSegmentIds: str = ""
    trueClass: str = ""
    networkKind: Annotated[str, Choice(NETWORK_KINDS)] = "builtin"
    builtinNetwork: Annotated[str, Choice(BUILTIN_NETWORKS)] = "demo"
    networkPath: str = ""
    outputActivation: Annotated[str, Choice(OUTPUT_ACTIVATIONS)] = "auto"
    trustCheckpoint: bool = False
    networkFolds: str = ""
    testTimeMirroring: bool = True
    skipUntwinned: bool = False
    probe: str = "pgd"
    probeParameters: str = "{}"
    epsilons: str = "0.005 0.01 0.02"
    severities: str = "1 3 5"
    unstableAt: str = ""
    regionSegmentation: vtkMRMLSegmentationNode
    regionSegmentId: str = ""
    device: Annotated[str, Choice(DEVICES)] = "cpu"
    compareNetworks: str = "demo-unet-short, demo-segresnet, demo-slicewise2d"
    compareFolder: str = ""
    compareProbes: str = ""
    compareSeeds: str = ""


#
# MedAdvRobustnessWidget
#


class MedAdvRobustnessWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI: parameter node bound to the .ui, Apply/Cancel, progress polled by a timer, comparison view."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._onRunDone = None
        self._lastNodes = None
        self._lastReport = None
        self._parameterEditors = {}
        self._compareFormKey = None  # what the compare form last showed: rebuilt only when that changes
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.connect("timeout()", self._poll)

    def setup(self) -> None:
        """Load the .ui file, connect it to the parameter node and the buttons."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedAdvRobustness.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedAdvRobustnessLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.networkBrowseButton.connect("clicked(bool)", self.onNetworkBrowseButton)
        self.ui.comparisonViewButton.connect("clicked(bool)", self.onComparisonViewButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependenciesButton)
        self.ui.referenceSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onReferenceChanged)
        self.ui.referenceSegmentsSelector.connect("segmentSelectionChanged(QStringList)", self.onReferenceSegments)
        self.ui.regionSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onRegionChanged)
        self.ui.regionSegmentSelector.connect("currentSegmentChanged(QString)", self.onRegionChanged)
        self.ui.probeComboBox.connect("currentIndexChanged(int)", self.onProbeChanged)
        self.ui.compareVolumesSelector.connect("checkedNodesChanged()", self.onCompareVolumesChanged)
        self.ui.compareNetworksList.connect("itemChanged(QListWidgetItem*)", self.onCompareNetworksChanged)
        self.ui.compareAddNetworkButton.connect("clicked(bool)", self.onCompareAddNetwork)
        self.ui.compareFolderBrowseButton.connect("clicked(bool)", self.onCompareFolderBrowse)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.openReportButton.connect("clicked(bool)", self.onOpenReport)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = ""
        self.initializeParameterNode()
        self._setRunning(False)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._timer.stop()
        if self._run is not None:
            self._run.abandon()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def onReload(self) -> None:
        """Slicer's Reload re-executes only this file: forget the library's modules too, so that the module imports
        the code on disk again, as its worker process does."""
        from MedAdvRobustnessLib.module import unload_library

        unload_library()
        ScriptedLoadableModuleWidget.onReload(self)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        """Stop a running probe (its results would belong to the closed scene) and forget the parameter node."""
        if self._run is not None:
            self._run.cancel()
        self._lastNodes = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node -------------------------------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists and is observed; preselect the first (non-label) volume."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volumes = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if not node.IsA("vtkMRMLLabelMapVolumeNode")]
            if volumes:
                self._parameterNode.inputVolume = volumes[0]

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the GUI to ``inputParameterNode``: widgets with a SlicerParameterName by the wrapper, the rest here."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        self._compareFormKey = None  # node IDs repeat in a new scene: show the form afresh
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        """Show the parameters the wrapper does not bind, and only the settings that apply."""
        parameters = self._parameterNode
        if parameters is None:
            return
        self._blocked(self.ui.referenceSelector, lambda: self.ui.referenceSelector.setCurrentNode(
            parameters.referenceNode))
        reference = parameters.referenceNode
        isSegmentation = bool(reference) and reference.IsA("vtkMRMLSegmentationNode")
        self.ui.referenceSegmentsSelector.visible = isSegmentation
        self.ui.referenceSegmentsLabel.visible = isSegmentation
        if isSegmentation:
            self._blocked(self.ui.referenceSegmentsSelector, lambda: (
                self.ui.referenceSegmentsSelector.setCurrentNode(reference),
                self.ui.referenceSegmentsSelector.setSelectedSegmentIDs(
                    [s for s in parameters.referenceSegmentIds.split(",") if s])))
        self._blocked(self.ui.regionSegmentSelector, lambda: (
            self.ui.regionSegmentSelector.setCurrentNode(parameters.regionSegmentation),
            self.ui.regionSegmentSelector.setCurrentSegmentID(parameters.regionSegmentId)))
        builtin = parameters.networkKind == "builtin"
        for widget in (self.ui.builtinNetworkComboBox, self.ui.builtinNetworkLabel):
            widget.visible = builtin
        for widget in (self.ui.networkPathLineEdit, self.ui.networkBrowseButton, self.ui.networkPathLabel,
                       self.ui.trustCheckpointCheckBox):
            widget.visible = not builtin
        for widget, kind in ((self.ui.networkFoldsLineEdit, "nnunet"), (self.ui.networkFoldsLabel, "nnunet"),
                             (self.ui.testTimeMirroringCheckBox, "nnunet"), (self.ui.skipUntwinnedCheckBox, "bundle")):
            widget.visible = parameters.networkKind == kind
        self._updateCompareForm()
        self._updateProbeForm()
        self._updateButtons()

    @staticmethod
    def _blocked(widget, change) -> None:
        wasBlocked = widget.blockSignals(True)
        try:
            change()
        finally:
            widget.blockSignals(wasBlocked)

    def onReferenceChanged(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.referenceNode = node
            self._parameterNode.referenceSegmentIds = ""

    def onReferenceSegments(self, segmentIds) -> None:
        if self._parameterNode:
            self._parameterNode.referenceSegmentIds = ",".join(segmentIds)

    def onRegionChanged(self, *args) -> None:
        if self._parameterNode:
            with slicer.util.NodeModify(self._parameterNode.parameterNode):
                self._parameterNode.regionSegmentation = self.ui.regionSegmentSelector.currentNode()
                self._parameterNode.regionSegmentId = self.ui.regionSegmentSelector.currentSegmentID() or ""

    # --- compare networks ------------------------------------------------------------------------------------------

    def _updateCompareForm(self) -> None:
        """Check the stored volumes and networks (built-in networks always listed, added paths after them); only
        when the checked volumes, the scene's volumes or the networks changed since the last time."""
        parameterNode = self._parameterNode.parameterNode
        checked = {parameterNode.GetNthNodeReferenceID("compareVolumes", index)
                   for index in range(parameterNode.GetNumberOfNodeReferences("compareVolumes"))}
        volumes = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if not node.IsA("vtkMRMLLabelMapVolumeNode")]
        key = (parameterNode.GetID(), tuple(sorted(checked)), tuple(node.GetID() for node in volumes),
               self._parameterNode.compareNetworks)
        if key == self._compareFormKey:
            return
        self._compareFormKey = key
        selector = self.ui.compareVolumesSelector
        self._blocked(selector, lambda: [selector.setCheckState(node, qt.Qt.Checked if node.GetID() in checked
                                                                else qt.Qt.Unchecked) for node in volumes])
        networks = [item.strip() for item in self._parameterNode.compareNetworks.split(",") if item.strip()]
        listWidget = self.ui.compareNetworksList
        listed = [listWidget.item(row).text() for row in range(listWidget.count)]

        def fill():
            for name in COMPARE_NETWORKS + networks:
                if name not in listed:
                    item = qt.QListWidgetItem(name, listWidget)
                    item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                    listed.append(name)
            for row in range(listWidget.count):
                item = listWidget.item(row)
                item.setCheckState(qt.Qt.Checked if item.text() in networks else qt.Qt.Unchecked)

        self._blocked(listWidget, fill)

    def onCompareVolumesChanged(self) -> None:
        if self._parameterNode:
            parameterNode = self._parameterNode.parameterNode
            with slicer.util.NodeModify(parameterNode):
                parameterNode.RemoveNodeReferenceIDs("compareVolumes")
                for node in self.ui.compareVolumesSelector.checkedNodes():
                    parameterNode.AddNodeReferenceID("compareVolumes", node.GetID())

    def onCompareNetworksChanged(self, item=None) -> None:
        if self._parameterNode:
            listWidget = self.ui.compareNetworksList
            self._parameterNode.compareNetworks = ", ".join(
                listWidget.item(row).text() for row in range(listWidget.count)
                if listWidget.item(row).checkState() == qt.Qt.Checked)

    def onCompareAddNetwork(self) -> None:
        """Add a model folder (model.json or MONAI bundle) or a TorchScript file, checked."""
        path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(),
                                                   _("Select a model folder or MONAI bundle (Cancel: pick a file)"))
        if not path:
            path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Select a TorchScript network"), "",
                                                  _("Networks (*.pt *.pth *.ts *.zip);;All files (*)"))
        if path:
            networks = [item.strip() for item in self._parameterNode.compareNetworks.split(",") if item.strip()]
            self._parameterNode.compareNetworks = ", ".join(networks + [path])

    def onCompareFolderBrowse(self) -> None:
        path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Select the study folder"))
        if path:
            self._parameterNode.compareFolder = path

    def onCompareButton(self) -> None:
        """Start the comparison (same progress, Cancel and error handling as Apply)."""
        self._startRun(self.logic.startComparison, self._showStudy, "compare")

    def _showStudy(self, nodes) -> None:
        self._lastReport = nodes["report"]
        self.ui.statusLabel.text = _("Done: {computed} cells computed, {reused} reused; study in {folder}.").format(
            computed=nodes["computed"], reused=nodes["reused"], folder=nodes["study"])
        self.logic.showStudy(nodes)

    def onOpenReport(self) -> None:
        if self._lastReport:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self._lastReport))

    # --- probe and its parameters ---------------------------------------------------------------------------------

    def _updateProbeForm(self) -> None:
        """Probe list and the selected probe's own parameters (library defaults); needs the library (torch)."""
        parameters = self._parameterNode
        ready = self._updateProbePanelEnabled()
        if not ready:
            self.ui.probeSummaryLabel.text = _("Install the dependencies (Results > Check / install) to choose "
                                               "a probe.")
            return
        from MedAdvRobustnessLib.probes import registry

        names = registry.probe_names()
        combo = self.ui.probeComboBox
        if combo.count != len(names):
            self._blocked(combo, lambda: (combo.clear(), [combo.addItem(name) for name in names]))
        self._blocked(combo, lambda: combo.setCurrentIndex(max(0, names.index(parameters.probe)
                                                               if parameters.probe in names else 0)))
        corruption = registry.is_corruption(parameters.probe)
        for widget in (self.ui.epsilonsLineEdit, self.ui.epsilonsLabel):
            widget.visible = not corruption
        for widget in (self.ui.severitiesLineEdit, self.ui.severitiesLabel):
            widget.visible = corruption
        self.ui.probeSummaryLabel.text = registry.probe_summary(parameters.probe)
        self._buildParameterEditors(registry.probe_parameters(parameters.probe), parameters.probe)

    def _updateProbePanelEnabled(self) -> bool:
        """The probe panel is usable when no run is going and PyTorch and MONAI are there in good versions (an old
        torch imported by the form would stay loaded after an upgrade); returns whether the dependencies are. The
        answer is cached until an install (it is asked on every change of the parameter node)."""
        ready = not self.logic.dependencyProblems("run")
        self.ui.probeCollapsibleButton.enabled = ready and self._run is None
        return ready

    def _buildParameterEditors(self, probeParameters, probe) -> None:
        """One line edit per parameter, holding the stored value or showing the library default."""
        from MedAdvRobustnessLib.probes.parameters import value_text

        layout = self.ui.probeParametersGroupBox.layout()
        if getattr(self, "_editorsProbe", None) != probe:
            while layout.count():
                item = layout.takeAt(0)
                if item.widget():
                    item.widget().deleteLater()
            self._parameterEditors = {}
            for parameter in probeParameters:
                editor = qt.QLineEdit()
                editor.placeholderText = _("default: {value}").format(value=value_text(parameter.default))
                choices = " ({})".format(" | ".join(parameter.choices)) if parameter.choices else ""
                editor.toolTip = parameter.help + choices
                editor.connect("editingFinished()", self.onProbeParameterEdited)
                layout.addRow(parameter.name + ":", editor)
                self._parameterEditors[parameter.name] = editor
            self._editorsProbe = probe
        stored = self._storedProbeParameters().get(probe, {})
        for name, editor in self._parameterEditors.items():
            self._blocked(editor, lambda editor=editor, name=name: setattr(editor, "text", stored.get(name, "")))

    def _storedProbeParameters(self):
        try:
            stored = json.loads(self._parameterNode.probeParameters or "{}")
        except ValueError:
            stored = {}
        return stored if isinstance(stored, dict) else {}

    def onProbeChanged(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.probe = self.ui.probeComboBox.itemText(index)

    def onProbeParameterEdited(self) -> None:
        """Store the edited values of the selected probe (empty: the library default)."""
        stored = self._storedProbeParameters()
        stored[self._parameterNode.probe] = {name: editor.text.strip()
                                             for name, editor in self._parameterEditors.items()
                                             if editor.text.strip()}
        self._parameterNode.probeParameters = json.dumps(stored, sort_keys=True)

    # --- running --------------------------------------------------------------------------------------------------

    def _updateButtons(self) -> None:
        running = self._run is not None
        ready = bool(self._parameterNode and self._parameterNode.inputVolume) and not running
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Run the probe; results go to a new folder in the scene.") if ready \
            else _("Select an input volume")
        self.ui.comparisonViewButton.enabled = bool(self._lastNodes) and not running
        self.ui.compareButton.enabled = not running
        self.ui.openReportButton.enabled = bool(self._lastReport) and not running

    def _setRunning(self, running: bool) -> None:
        for widget in (self.ui.inputsCollapsibleButton, self.ui.networkCollapsibleButton,
                       self.ui.compareCollapsibleButton):
            widget.enabled = not running
        self._updateProbePanelEnabled()
        self.ui.cancelButton.enabled = running
        self._updateButtons()

    def onNetworkBrowseButton(self) -> None:
        """Pick the network: a folder for bundles and nnU-Net models, else a file."""
        if self._parameterNode.networkKind in ("bundle", "nnunet"):
            title = _("Select a MONAI bundle folder") if self._parameterNode.networkKind == "bundle" else \
                _("Select an nnU-Net trained model folder (TRAINER__PLANS__CONFIGURATION)")
            path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), title)
        else:
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Select the network"), "",
                _("Networks (model.json *.pt *.pth *.ts *.zip);;All files (*)"))
        if path:
            self._parameterNode.networkPath = path

    def onApplyButton(self) -> None:
        """Check the inputs, start the worker; the timer polls it."""
        self._startRun(self.logic.start, self._showProbeResults, "run")

    def _startRun(self, start, onDone, feature) -> None:
        """``start(parameterNode)`` returns the running worker; ``onDone(nodes)`` shows what it added; ``feature``
        ("run" or "compare") says which dependencies it needs."""
        if not self.ensureDependencies(feature):
            return
        try:
            self._run = start(self._parameterNode)
        except Exception as error:
            self._showError(error)
            return
        self._onRunDone = onDone
        self._setRunning(True)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Loading the network...")
        self._timer.start()

    def onCancelButton(self) -> None:
        """Ask the worker to stop at its next iteration; nothing is added to the scene."""
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    def _poll(self) -> None:
        """Timer: show progress; when the worker is done, add the results (main thread) or report why not."""
        run = self._run
        if run is None:
            self._timer.stop()
            return
        fraction, message = run.progress
        self.ui.progressBar.value = int(round(100 * fraction))
        if not run.cancelled:
            self.ui.statusLabel.text = message
        if not run.done:
            return
        self._timer.stop()
        self._run = None
        from MedAdvRobustnessLib.probes.attacks import AttackCancelled

        try:
            with slicer.util.WaitCursor():
                nodes = run.finish()
        except AttackCancelled:
            self.ui.statusLabel.text = _("Cancelled: nothing was added to the scene.")
        except Exception as error:
            self._showError(error)
        else:
            self.ui.progressBar.value = 100
            self._onRunDone(nodes)
        finally:
            self._setRunning(False)

    def _showProbeResults(self, nodes) -> None:
        self._lastNodes = nodes
        folder = slicer.mrmlScene.GetSubjectHierarchyNode().GetItemName(nodes["folder"])
        text = _("Done: results in folder \"{folder}\".").format(folder=folder)
        if nodes.get("status"):  # a classifier's predicted class, clean and under the strongest probe
            text += " " + _("Predicted {status}.").format(status=nodes["status"])
        self.ui.statusLabel.text = text
        self.logic.showComparison(nodes)

    def _showError(self, error) -> None:
        """One clear message; details (traceback) in the log."""
        from MedAdvRobustnessLib.errors import InputError

        if isinstance(error, InputError):
            text = str(error)
            logging.error("MedAdvRobustness: %s", error)
        else:
            text = _("The run failed: {message}").format(message=error)
            logging.error("MedAdvRobustness: the run failed", exc_info=(type(error), error, error.__traceback__))
        self.ui.statusLabel.text = _("Failed: {message}").format(message=error)
        slicer.util.errorDisplay(text, windowTitle=_("MedAdvRobustness"),
                                 detailedText=_("Details are in the Python console and the application log."))

    def onComparisonViewButton(self) -> None:
        if self._lastNodes:
            self.logic.showComparison(self._lastNodes)

    def onInstallDependenciesButton(self) -> None:
        self.logic.forgetDependencies()  # the user may have installed something meanwhile
        if self.ensureDependencies("all"):
            slicer.util.infoDisplay(_("Every package the module uses is installed."),
                                    windowTitle=_("MedAdvRobustness"))
            self._updateGui()

    def ensureDependencies(self, feature="run") -> bool:
        """True if the packages ``feature`` needs ("run": Apply, "compare", "all") are there in good versions;
        otherwise offer to install every missing package (after confirmation)."""
        if not self.logic.dependencyProblems(feature):
            return True
        problems = self.logic.dependencyProblems("all")
        message = _("This module needs:\n- {problems}\n\nPyTorch is installed by the PyTorch extension (it picks the "
                    "build for your GPU driver), the others with pip, without changing the installed torch and "
                    "numpy. This can take several minutes.\n\nInstall now?").format(problems="\n- ".join(problems))
        if not slicer.util.confirmOkCancelDisplay(message, windowTitle=_("MedAdvRobustness: install dependencies")):
            return False
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to install the dependencies."), waitCursor=True):
                self.logic.installDependencies()
        except Exception:
            logging.exception("MedAdvRobustness: installing the dependencies failed")
            return False
        finally:
            self._compareFormKey = None
            self._updateGui()
        problems = self.logic.dependencyProblems(feature)
        if problems:
            slicer.util.errorDisplay(_("Still missing: {problems}. Restart Slicer and try again.").format(
                problems="; ".join(problems)), windowTitle=_("MedAdvRobustness"))
            return False
        return True


#
# MedAdvRobustnessLogic
#


class MedAdvRobustnessLogic(ScriptedLoadableModuleLogic):
    """Thin binding of MedAdvRobustnessLib.module.logic to the application's scene; usable without the widget."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return MedAdvRobustnessParameterNode(super().getParameterNode())

    @staticmethod
    def dependencyProblems(feature="run"):
        """What ``feature`` ("run": Apply, "compare": Compare networks, "all") misses, as text (empty: all good).
        Read from the package metadata once, then cached until :meth:`forgetDependencies` (or an install)."""
        from MedAdvRobustnessLib.module import dependencies

        return dependencies.problems(feature)

    @staticmethod
    def forgetDependencies() -> None:
        from MedAdvRobustnessLib.module import dependencies

        dependencies.forget()

    @staticmethod
    def installDependencies() -> None:
        """PyTorch with the PyTorch extension's utilities, then every other missing package with pip, constrained
        to the installed torch, torchvision and numpy (installing MONAI must not replace the torch chosen for the
        GPU driver). Uses ``slicer.packaging.pip_ensure`` where Slicer has it (5.12 and later), else
        ``slicer.util.pip_install``. Offers a restart when a package that is already imported changed."""
        from MedAdvRobustnessLib.module import dependencies

        if any(dependency.distribution == "torch" for dependency in dependencies.missing("all")):
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("PyTorch is missing: install the PyTorch extension with the Extensions "
                                     "Manager, restart Slicer and try again."))
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                               torchVersionRequirement=TORCH_REQUIREMENT) is None:
                raise RuntimeError(_("PyTorch was not installed."))
            dependencies.forget()
        missing = dependencies.missing("all")
        before = dependencies.installed_versions()
        with tempfile.TemporaryDirectory(prefix="medadv-pip-") as folder:
            constraints = dependencies.write_constraints(os.path.join(folder, "constraints.txt"))
            withDependencies = [dependency.requirement for dependency in missing if not dependency.no_deps]
            withoutDependencies = [dependency.requirement for dependency in missing if dependency.no_deps]
            try:
                pip_ensure = importlib.import_module("slicer.packaging").pip_ensure
            except (ImportError, AttributeError):  # before Slicer 5.12
                pip_ensure = None
            try:
                if withDependencies and pip_ensure is not None:
                    # the widget has asked already; the restart question comes below, for both installs
                    pip_ensure(withDependencies, constraints=constraints, prompt_install=False, prompt_restart=False,
                               requester="MedAdvRobustness")
                elif withDependencies:
                    slicer.util.pip_install(["-c", constraints] + withDependencies)
                if withoutDependencies:
                    slicer.util.pip_install(["--no-deps", "-c", constraints] + withoutDependencies)
            finally:
                dependencies.forget()
        changed = dependencies.changed_imported(before, dependencies.installed_versions())
        if changed:
            details = "\n".join("{}: {} -> {}".format(name, old or _("(reinstalled)"), new)
                                for name, old, new in changed)
            logging.info("MedAdvRobustness: updated packages that were already imported:\n%s", details)
            if not slicer.app.testingEnabled() and slicer.util.confirmYesNoDisplay(
                    _("Packages that were already loaded have changed; they work correctly only after a restart of "
                      "Slicer.\n\nRestart now?"), windowTitle=_("MedAdvRobustness: restart"), detailedText=details):
                slicer.util.restart()

    def start(self, parameterNode):
        """Start a run from the parameter node (InputError on bad input, nothing added); see MedAdvRobustnessLib.module.logic."""
        from MedAdvRobustnessLib.module.logic import start_run
        from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

        node = getattr(parameterNode, "parameterNode", parameterNode)
        return start_run(SlicerScene.current(), node)

    def startComparison(self, parameterNode):
        """Start "compare networks" from the parameter node; see MedAdvRobustnessLib.module.compare."""
        from MedAdvRobustnessLib.module.compare import start_comparison
        from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

        node = getattr(parameterNode, "parameterNode", parameterNode)
        return start_comparison(SlicerScene.current(), node)

    def process(self, parameterNode):
        """Run synchronously (scripts, the self-test): the result nodes by role, with their ``folder``."""
        run = self.start(parameterNode)
        run.wait()
        return run.finish()

    @staticmethod
    def showComparison(nodes) -> None:
        """Clean and attacked side by side (linked, outlines; the fragility map over the clean volume, the
        perturbation over the attacked one), plot and table below; the slices centred on the largest cluster of
        unstable voxels. A classifier's results: see :meth:`showClassification`."""
        from MedAdvRobustnessLib.scene.layouts import show_comparison

        if "segmentation" not in nodes:
            MedAdvRobustnessLogic.showClassification(nodes)
            return
        layoutManager = MedAdvRobustnessLogic._comparisonLayout()
        MedAdvRobustnessLogic._showSigned(nodes["perturbation"][max(nodes["probed"])])
        show_comparison(slicer.mrmlScene, nodes,
                        fit_view=lambda viewName: layoutManager.sliceWidget(viewName).sliceLogic().FitSliceToAll())
        MedAdvRobustnessLogic._showChartAndTable(layoutManager, nodes)

    @staticmethod
    def showClassification(nodes) -> None:
        """A classifier's results: the clean image under its saliency map beside the most strongly probed image
        under its perturbation (linked slices), the confidence-vs-strength chart and the metrics table below."""
        from MedAdvRobustnessLib.scene.layouts import ATTACKED_VIEW, CLEAN_VIEW

        layoutManager = MedAdvRobustnessLogic._comparisonLayout()
        strongest = max(nodes["probed"])
        perturbation = nodes["perturbation"][strongest]
        if perturbation.GetImageData().GetNumberOfScalarComponents() == 1:
            MedAdvRobustnessLogic._showSigned(perturbation)
        else:  # a colour image's perturbation: a vector volume of its own, no overlay
            perturbation = None
        saliencyDisplay = nodes["saliency"].GetDisplayNode()
        saliencyDisplay.SetAndObserveColorNodeID("vtkMRMLColorTableNodeIron")
        cleanSlice = layoutManager.sliceWidget(CLEAN_VIEW).mrmlSliceNode()
        layoutManager.sliceWidget(ATTACKED_VIEW).mrmlSliceNode().SetOrientation(cleanSlice.GetOrientation())
        views = ((CLEAN_VIEW, nodes["input"], nodes["saliency"], 0.5),
                 (ATTACKED_VIEW, nodes["probed"][strongest], perturbation, 0.4))
        for viewName, background, overlay, opacity in views:
            sliceWidget = layoutManager.sliceWidget(viewName)
            composite = sliceWidget.mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(background.GetID() if background else None)
            composite.SetForegroundVolumeID(overlay.GetID() if overlay is not None else None)
            composite.SetForegroundOpacity(opacity)
            composite.SetLinkedControl(True)
            sliceWidget.sliceLogic().FitSliceToAll()
        MedAdvRobustnessLogic._showChartAndTable(layoutManager, nodes)

    @staticmethod
    def _comparisonLayout():
        """Switch to the side-by-side layout (registered again after a module reload); the layout manager."""
        from MedAdvRobustnessLib.scene.layouts import COMPARISON_LAYOUT, COMPARISON_LAYOUT_ID

        layoutManager = slicer.app.layoutManager()
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()
        if not layoutNode.IsLayoutDescription(COMPARISON_LAYOUT_ID):
            layoutNode.AddLayoutDescription(COMPARISON_LAYOUT_ID, COMPARISON_LAYOUT)
        else:  # after a module reload the registered text may be an older one
            layoutNode.SetLayoutDescription(COMPARISON_LAYOUT_ID, COMPARISON_LAYOUT)
        layoutManager.setLayout(COMPARISON_LAYOUT_ID)
        return layoutManager

    @staticmethod
    def _showSigned(volume) -> None:
        """A diverging colour map, zero in the middle colour."""
        display = volume.GetDisplayNode()
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileDivergingBlueRed.txt")
        largest = max(abs(value) for value in volume.GetImageData().GetScalarRange()) or 1.0
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(-largest, largest)

    @staticmethod
    def _showChartAndTable(layoutManager, nodes) -> None:
        plotWidget = layoutManager.plotWidget(0)
        plotWidget.mrmlPlotViewNode().SetPlotChartNodeID(nodes["chart"].GetID())
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetActiveTableID(nodes["metrics"].GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    @staticmethod
    def showStudy(nodes) -> None:
        """The comparison's Dice chart and summary table in the plot and table views."""
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
        slicer.modules.plots.logic().ShowChartInLayout(nodes["chart"])
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetActiveTableID(nodes["summary"].GetID())
        slicer.app.applicationLogic().PropagateTableSelection()


#
# MedAdvRobustnessTest
#


class MedAdvRobustnessTest(ScriptedLoadableModuleTest):
    """Runs the logic on the embedded sample inside Slicer, through the parameter node."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_MedAdvRobustness_pgd_on_sample, self.test_MedAdvRobustness_compare_networks_on_sample):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:  # Reload and Test calls runTest directly: report, do not fail
                self.delayDisplay("Skipped {}: {}".format(test.__name__, reason))

    def test_MedAdvRobustness_pgd_on_sample(self):
        """PGD (2 steps) at epsilon 0.02 on the sample adds the result nodes in one folder on the input's grid."""
        logic, parameters, volume = self._sampleParameters("run")
        parameters.probe = "pgd"
        parameters.probeParameters = json.dumps({"pgd": {"steps": "2"}})
        parameters.epsilons = "0.02"

        self.delayDisplay("Attacking (PGD, 2 steps, epsilon 0.02)")
        nodes = logic.process(parameters)

        adversarial = nodes["probed"][0.02]
        self.assertEqual(adversarial.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        self.assertEqual(self._ijkToRas(adversarial), self._ijkToRas(volume))
        self.assertEqual(sorted(nodes["segmentation"]), [0.0, 0.02])
        self.assertEqual(nodes["metrics"].GetNumberOfRows(), 8)
        self.assertTrue(nodes["chart"].IsA("vtkMRMLPlotChartNode"))
        hierarchy = slicer.mrmlScene.GetSubjectHierarchyNode()
        self.assertEqual(hierarchy.GetItemName(nodes["folder"]), "MNI152_T1_2mm demo-unet pgd")
        self.assertEqual(hierarchy.GetItemParent(hierarchy.GetItemByDataNode(adversarial)), nodes["folder"])
        logic.showComparison(nodes)
        from MedAdvRobustnessLib.scene.layouts import ATTACKED_VIEW, CLEAN_VIEW
        layoutManager = slicer.app.layoutManager()
        cleanView, attackedView = (layoutManager.sliceWidget(name) for name in (CLEAN_VIEW, ATTACKED_VIEW))
        self.assertEqual(cleanView.mrmlSliceNode().GetOrientation(), attackedView.mrmlSliceNode().GetOrientation())
        self.assertEqual(attackedView.mrmlSliceCompositeNode().GetBackgroundVolumeID(), adversarial.GetID())
        self.assertTrue(attackedView.mrmlSliceCompositeNode().GetLinkedControl())
        self.delayDisplay("Test passed")

    def test_MedAdvRobustness_compare_networks_on_sample(self):
        """FGSM at epsilon 0.02 on two built-in networks over the sample fills one summary table and one chart."""
        logic, parameters, volume = self._sampleParameters("compare")
        parameters.parameterNode.AddNodeReferenceID("compareVolumes", volume.GetID())
        parameters.compareNetworks = "demo-unet-short, demo-slicewise2d"
        parameters.probe = "fgsm"
        parameters.epsilons = "0.02"

        self.delayDisplay("Comparing two networks (FGSM, epsilon 0.02)")
        run = logic.startComparison(parameters)
        while not run.done:
            slicer.app.processEvents()
            run.wait(0.1)
        nodes = run.finish()

        self.assertEqual(nodes["computed"], 2)
        self.assertEqual(nodes["summary"].GetNumberOfRows(), 4)  # (network, fgsm) and overall, per network
        self.assertEqual(nodes["chart"].GetNumberOfPlotSeriesNodes(), 2)
        self.assertTrue(os.path.isfile(nodes["report"]))
        logic.showStudy(nodes)
        self.delayDisplay("Test passed")

    def _sampleParameters(self, feature):
        """The logic and its parameter node with the sample and its tissue labels as input and reference; skips
        the test when a package ``feature`` needs is missing (installing is left to the user)."""
        logic = MedAdvRobustnessLogic()
        logic.forgetDependencies()
        if logic.dependencyProblems(feature):
            self.skipTest("needs {}".format("; ".join(logic.dependencyProblems(feature))))
        volume = slicer.util.loadVolume(os.path.join(SAMPLE_DIR, "MNI152_T1_2mm.nii.gz"))
        parameters = logic.getParameterNode()
        parameters.inputVolume = volume
        parameters.referenceNode = slicer.util.loadLabelVolume(os.path.join(SAMPLE_DIR, "MNI152_tissue_2mm.nii.gz"))
        return logic, parameters, volume

    @staticmethod
    def _ijkToRas(node):
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        return [round(matrix.GetElement(row, column), 6) for row in range(4) for column in range(4)]
