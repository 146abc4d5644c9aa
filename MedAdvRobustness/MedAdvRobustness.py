"""3D Slicer module: attack a segmentation network with FGSM/PGD and add the results to the scene.

All computation lives in MedAdvRobustnessLib (imported lazily: it needs torch and MONAI); this file only binds
the GUI to a parameter node and calls ``MedAdvRobustnessLib.pipeline.run_on_nodes``.
"""
import importlib.util
import logging
import re
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEPENDENCIES = ("torch", "monai")


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
        self.parent.contributors = ["MedAdvRobustness maintainers"]
        self.parent.helpText = _("""
Attacks a segmentation network (the built-in demo, a MONAI model folder or a TorchScript file) on the selected
volume with FGSM or PGD (L-infinity, epsilon as a fraction of the intensity range) and adds to the scene the
adversarial volumes, the perturbations, the clean and attacked segmentations, a metrics table and the
Dice-vs-epsilon chart.
See the <a href="https://github.com/medadvrobustness/SlicerMedAdvRobustness">project page</a>.
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer, PyTorch and MONAI. The embedded sample is derived from the MNI ICBM152 2009 template
(Fonov et al., NeuroImage 2009, 2011).
""")


#
# MedAdvRobustnessParameterNode
#


@parameterNodeWrapper
class MedAdvRobustnessParameterNode:
    """The module's inputs.

    inputVolume - the volume to attack.
    referenceVolume - optional reference label map on the volume's grid (else the clean prediction is the target).
    model - "demo", a model folder (with model.json) or a TorchScript file.
    attack - "fgsm" or "pgd".
    epsilons - L-infinity budgets as fractions of the intensity range, separated by spaces or commas.
    steps, seed - PGD iterations and the seed of its random start.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    referenceVolume: vtkMRMLLabelMapVolumeNode
    model: str = "demo"
    attack: Annotated[str, Choice(["fgsm", "pgd"])] = "pgd"
    epsilons: str = "0.005 0.01 0.02"
    steps: Annotated[int, WithinRange(1, 1000)] = 10
    seed: Annotated[int, Minimum(0)] = 0


#
# MedAdvRobustnessWidget
#


class MedAdvRobustnessWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI: parameter node bound to the .ui widgets, Apply, progress and Cancel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False

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
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onModelBrowseButton)
        self._setRunning(False)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = ""

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed: stop a running attack, forget the parameter node."""
        self._cancelRequested = True
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists and is observed; preselect the first (non-label) volume."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volumes = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if not node.IsA("vtkMRMLLabelMapVolumeNode")]
            if volumes:
                self._parameterNode.inputVolume = volumes[0]

    def setParameterNode(self, inputParameterNode: Optional[MedAdvRobustnessParameterNode]) -> None:
        """Bind the GUI to ``inputParameterNode`` (widgets carry a SlicerParameterName property in the .ui)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Enable Apply when an input volume is selected; PGD settings only for PGD."""
        parameters = self._parameterNode
        ready = bool(parameters and parameters.inputVolume) and not self._running
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Attack the network and add the results to the scene") if ready \
            else _("Select an input volume")
        isPgd = bool(parameters) and parameters.attack == "pgd"
        self.ui.stepsSpinBox.enabled = isPgd
        self.ui.seedSpinBox.enabled = isPgd

    def _setRunning(self, running: bool) -> None:
        self._running = running
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.cancelButton.enabled = running
        self._checkCanApply()

    def onModelBrowseButton(self) -> None:
        """Pick a model.json or a TorchScript file."""
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Select a model"), "",
            _("Models (model.json *.pt *.pth *.ts);;All files (*)"))
        if path and self._parameterNode:
            self._parameterNode.model = path

    def onCancelButton(self) -> None:
        """Ask the running attack to stop at its next iteration."""
        self._cancelRequested = True
        self.ui.statusLabel.text = _("Cancelling...")

    def _onProgress(self, fraction, message) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # keeps the GUI alive and lets Cancel be clicked

    def onApplyButton(self) -> None:
        """Run the attack through the logic; show one clear message if it fails."""
        if not self.ensureDependencies():
            return
        from MedAdvRobustnessLib.attacks import AttackCancelled
        from MedAdvRobustnessLib.errors import InputError

        self._cancelRequested = False
        self._setRunning(True)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Loading the model...")
        slicer.app.processEvents()
        try:
            nodes = self.logic.processParameterNode(
                self._parameterNode, progress=self._onProgress, is_cancelled=lambda: self._cancelRequested)
        except AttackCancelled:
            self.ui.statusLabel.text = _("Cancelled: no result was added to the scene.")
        except InputError as error:
            self.ui.statusLabel.text = _("Failed: {message}").format(message=error)
            slicer.util.errorDisplay(str(error), windowTitle=_("MedAdvRobustness"))
        except Exception as error:
            logging.exception("MedAdvRobustness: the attack failed")
            self.ui.statusLabel.text = _("Failed (see the log).")
            slicer.util.errorDisplay(
                _("The attack failed: {message}\n\nDetails are in the Python console and the application log.")
                .format(message=error), windowTitle=_("MedAdvRobustness"))
        else:
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = _("Done: results added to the scene ({table}).").format(
                table=nodes["metrics"].GetName())
            self.logic.showResults(nodes)
        finally:
            self._setRunning(False)

    def ensureDependencies(self) -> bool:
        """True if torch and MONAI import; otherwise offer to install them (only after the user confirms)."""
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        message = _(
            "This module needs the Python packages: {missing}.\n\n"
            "PyTorch is installed by the PyTorch extension (Extensions Manager > PyTorch), "
            "MONAI with slicer.util.pip_install(\"monai\"). This can take several minutes.\n\n"
            "Install them now?").format(missing=", ".join(missing))
        if not slicer.util.confirmOkCancelDisplay(message, windowTitle=_("MedAdvRobustness: install dependencies")):
            return False
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to install the dependencies."), waitCursor=True):
                self.logic.installDependencies()
        except Exception:
            logging.exception("MedAdvRobustness: installing the dependencies failed")
            return False
        return not self.logic.missingDependencies()


#
# MedAdvRobustnessLogic
#


class MedAdvRobustnessLogic(ScriptedLoadableModuleLogic):
    """Runs the attack on scene nodes with MedAdvRobustnessLib; usable without the widget."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return MedAdvRobustnessParameterNode(super().getParameterNode())

    @staticmethod
    def missingDependencies():
        """Names of the required Python packages (torch, monai) that are not installed."""
        return [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]

    @staticmethod
    def installDependencies() -> None:
        """Install PyTorch with the PyTorch extension, then MONAI with pip."""
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("Install the PyTorch extension from the Extensions Manager, restart Slicer "
                                     "and try again."))
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                               torchVersionRequirement=">=2.1") is None:
                raise RuntimeError(_("PyTorch was not installed."))
        if importlib.util.find_spec("monai") is None:
            slicer.util.pip_install("monai>=1.4")

    @staticmethod
    def parseEpsilons(text):
        """Epsilons from text such as ``"0.005 0.01, 0.02"``."""
        from MedAdvRobustnessLib.errors import InputError
        try:
            return [float(item) for item in re.split(r"[\s,;]+", str(text).strip()) if item]
        except ValueError:
            raise InputError(_("Epsilons must be numbers separated by spaces or commas, got \"{text}\".").format(
                text=text))

    def processParameterNode(self, parameterNode, progress=None, is_cancelled=None):
        """:meth:`process` with the values of a :class:`MedAdvRobustnessParameterNode`."""
        return self.process(parameterNode.inputVolume, parameterNode.referenceVolume, parameterNode.model,
                            parameterNode.attack, parameterNode.epsilons, parameterNode.steps, parameterNode.seed,
                            progress=progress, is_cancelled=is_cancelled)

    def process(self, inputVolume, referenceVolume=None, model="demo", attack="pgd", epsilons="0.005 0.01 0.02",
                steps=10, seed=0, progress=None, is_cancelled=None):
        """Attack ``model`` on ``inputVolume`` at each epsilon and add the result nodes to the scene.

        ``epsilons``: a list of numbers or text. ``progress(fraction, message)`` reports the work done,
        ``is_cancelled()`` stops between iterations (AttackCancelled, nothing added). Raises InputError for bad
        input. Returns the new nodes by role (see ``MedAdvRobustnessLib.results.add_result_nodes``).
        """
        from MedAdvRobustnessLib.attacks import applicable_parameters, make_attack
        from MedAdvRobustnessLib.errors import InputError
        from MedAdvRobustnessLib.models import load_model
        from MedAdvRobustnessLib.pipeline import run_on_nodes
        from MedAdvRobustnessLib.runner import check_epsilons
        from MedAdvRobustnessLib.scene import SlicerScene

        if inputVolume is None:
            raise InputError(_("Select an input volume."))
        if isinstance(epsilons, str):
            epsilons = self.parseEpsilons(epsilons)
        epsilons = check_epsilons(epsilons)
        attackMethod = make_attack(attack, **applicable_parameters(attack, steps=steps, seed=seed))
        network = load_model(str(model).strip())
        logging.info("MedAdvRobustness: %s on %s, epsilons %s", attack, inputVolume.GetName(), epsilons)
        _result, nodes = run_on_nodes(SlicerScene.current(), inputVolume, network, attackMethod, epsilons,
                                      reference_node=referenceVolume, progress=progress, is_cancelled=is_cancelled)
        return nodes

    @staticmethod
    def showResults(nodes) -> None:
        """Show the adversarial volume at the largest epsilon and the Dice-vs-epsilon chart."""
        largest = max(nodes["adversarial"])
        slicer.util.setSliceViewerLayers(background=nodes["adversarial"][largest], fit=True)
        slicer.modules.plots.logic().ShowChartInLayout(nodes["chart"])


#
# MedAdvRobustnessTest
#


class MedAdvRobustnessTest(ScriptedLoadableModuleTest):
    """Runs the logic on the embedded sample inside Slicer."""

    def setUp(self):
        """Start from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run all tests."""
        self.setUp()
        self.test_MedAdvRobustness_fgsm_on_sample()

    def test_MedAdvRobustness_fgsm_on_sample(self):
        """FGSM at epsilon 0.01 on the sample adds result nodes on the input's grid."""
        logic = MedAdvRobustnessLogic()
        missing = logic.missingDependencies()
        if missing:
            self.skipTest("needs the Python packages {}".format(", ".join(missing)))
        from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME

        self.delayDisplay("Loading the embedded sample")
        volume = slicer.util.loadVolume(str(SAMPLE_VOLUME))
        labels = slicer.util.loadLabelVolume(str(SAMPLE_LABELS))

        self.delayDisplay("Attacking (FGSM, epsilon 0.01)")
        nodes = logic.process(volume, labels, model="demo", attack="fgsm", epsilons=[0.01])

        adversarial = nodes["adversarial"][0.01]
        self.assertEqual(adversarial.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        self.assertEqual(self._ijkToRas(adversarial), self._ijkToRas(volume))
        self.assertIn(0.01, nodes["perturbation"])
        self.assertEqual(sorted(nodes["segmentation"]), [0.0, 0.01])
        self.assertGreater(nodes["metrics"].GetNumberOfRows(), 0)
        self.assertIsNotNone(nodes["chart"])
        self.assertTrue(nodes["chart"].IsA("vtkMRMLPlotChartNode"))
        self.assertGreater(nodes["chart"].GetNumberOfPlotSeriesNodes(), 0)
        self.delayDisplay("Test passed")

    @staticmethod
    def _ijkToRas(node):
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        return [round(matrix.GetElement(row, column), 6) for row in range(4) for column in range(4)]
