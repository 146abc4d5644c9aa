"""The extension against the rules the Slicer Extensions Index applies to a submission, read from the index's own
scripts (github.com/Slicer/ExtensionsIndex: scripts/check_description_files.py, scripts/extension_ai_analysis.py)
and the catalog entry schema (Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json), checked
offline: the description JSON, the top-level CMakeLists.txt as the index parses it, the licence file, the image
URLs (well-formed raw URLs of files in this repository at the index's revision), and the module file's imports.

Also the CI workflow that runs the module's self-test in a real Slicer, and scripts/slicer-selftest's errors.
"""
import ast
import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DESCRIPTION = ROOT / "MedAdvRobustness.json"
CMAKE = ROOT / "CMakeLists.txt"
MODULE_FILE = ROOT / "MedAdvRobustness" / "MedAdvRobustness.py"
WORKFLOW = ROOT / ".github" / "workflows" / "slicer.yml"
SELFTEST = ROOT / "scripts" / "slicer-selftest"
# the catalog entry schema v1.0.2: required keys, and every key it allows (additionalProperties: false)
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                     "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
                     "enabled": bool, "tier": int}
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
# check_description_files.py's patterns for the top-level CMakeLists.txt
PROJECT_PATTERN = r'project\s*\(\s*([^\s\)\n\r]+)'
ICON_PATTERN = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
SCREENSHOTS_PATTERN = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
# Python packages the index accepts at a module file's top level besides the standard library
SLICER_PROVIDED = {"slicer", "qt", "ctk", "vtk", "SimpleITK", "numpy", "scipy"}


def description():
    return json.loads(DESCRIPTION.read_text())


def cmake():
    return CMAKE.read_text()


def cmake_variable(name):
    match = re.search(r'set\(\s*EXTENSION_{}\s+"([^"]*)"\s*\)'.format(name), cmake())
    assert match, name
    return match.group(1)


def repository():
    """(owner, name) of the scm_url."""
    parts = urllib.parse.urlsplit(description()["scm_url"]).path.strip("/").split("/")
    return parts[0], re.sub(r"\.git$", "", parts[1])


def test_description_is_the_only_index_entry_and_follows_the_schema():
    assert not list(ROOT.glob("*.s4ext")), "the .s4ext format is obsolete: the index takes the .json entry"
    raw = DESCRIPTION.read_bytes()
    assert b"\r" not in raw, "the index refuses CR or CRLF line endings"
    entry = description()
    assert SCHEMA_REQUIRED <= set(entry)
    assert set(entry) <= set(SCHEMA_PROPERTIES), sorted(set(entry) - set(SCHEMA_PROPERTIES))
    for key, value in entry.items():
        assert isinstance(value, SCHEMA_PROPERTIES[key]), key
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema-v1.0.")
    assert 1 <= entry["tier"] <= 5
    assert all(isinstance(item, str) for item in entry["build_dependencies"])
    assert entry["build_dependencies"] == ["PyTorch"] == cmake_variable("DEPENDS").split()


def test_names_urls_and_category_pass_the_index_checks():
    entry = description()
    name = DESCRIPTION.stem
    assert not name.lower().startswith("slicer"), "the extension name must not start with Slicer"
    url = urllib.parse.urlsplit(entry["scm_url"])
    assert url.scheme in ("git", "https") and url.netloc == "github.com"
    owner, repo = repository()
    assert repo.startswith("Slicer"), "the repository name must start with Slicer"
    assert entry["category"] == cmake_variable("CATEGORY") == "Segmentation"  # one of the index's categories
    assert re.fullmatch(r"[A-Za-z0-9._/-]+", entry["scm_revision"])
    homepage = urllib.parse.urlsplit(cmake_variable("HOMEPAGE"))
    assert (homepage.scheme, homepage.netloc, homepage.path.strip("/")) == ("https", "github.com",
                                                                           "{}/{}".format(owner, repo))


def test_the_cmake_project_is_the_extension_name():
    projects = re.findall(PROJECT_PATTERN, cmake(), re.IGNORECASE | re.MULTILINE)
    assert projects and projects[0].strip('"') == DESCRIPTION.stem


def image_urls():
    icons = re.findall(ICON_PATTERN, cmake(), re.IGNORECASE | re.MULTILINE)
    screenshots = re.findall(SCREENSHOTS_PATTERN, cmake(), re.IGNORECASE | re.MULTILINE)
    assert len(icons) == 1 and len(screenshots) == 1, "the index reads one EXTENSION_ICONURL and one SCREENSHOTURLS"
    return [icons[0].strip()] + screenshots[0].split()


@pytest.mark.parametrize("index", range(3))
def test_icon_and_screenshot_urls_are_raw_urls_of_images_in_this_repository(index):
    urls = image_urls()
    assert len(urls) == 3
    url = urllib.parse.urlsplit(urls[index])
    assert url.scheme == "https" and url.netloc == "raw.githubusercontent.com" and not url.query
    owner, repo, revision, *path = url.path.strip("/").split("/")
    assert (owner, repo) == repository()
    assert revision == description()["scm_revision"], "the images of the revision the index builds"
    file = ROOT.joinpath(*path)
    assert file.is_file(), file
    assert file.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif")  # the index accepts these content types
    assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_licence_file_is_there_and_is_the_apache_licence_pyproject_declares():
    found = [name for name in LICENSE_NAMES if (ROOT / name).is_file()]
    assert found, "the index refuses an extension without a licence file in the repository root"
    text = (ROOT / found[0]).read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()


def test_the_module_file_imports_only_the_standard_library_and_slicer_at_its_top_level():
    tree = ast.parse(MODULE_FILE.read_text())
    imported = set()
    for statement in tree.body:
        if isinstance(statement, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in statement.names)
        elif isinstance(statement, ast.ImportFrom):
            imported.add(statement.module.split(".")[0])
        else:  # nothing runs at file scope but definitions and constants
            assert isinstance(statement, (ast.Expr, ast.Assign, ast.FunctionDef, ast.ClassDef)), ast.unparse(statement)
            if isinstance(statement, ast.Expr):
                assert isinstance(statement.value, ast.Constant), "only the docstring"
    assert imported - set(sys.stdlib_module_names) - SLICER_PROVIDED == set()


def test_the_dependency_list_the_module_imports_before_torch_uses_the_standard_library_only():
    path = ROOT / "MedAdvRobustness" / "MedAdvRobustnessLib" / "module" / "dependencies.py"
    for path in (path, path.with_name("__init__.py")):
        tree = ast.parse(path.read_text())
        names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module}
        assert names <= set(sys.stdlib_module_names), path


# --- a real Slicer in CI -------------------------------------------------------------------------------------------

def workflow():
    return yaml.safe_load(WORKFLOW.read_text())


def test_the_workflow_runs_the_self_test_in_slicer_stable_and_preview():
    document = workflow()
    triggers = document.get("on", document.get(True))  # YAML 1.1 reads the key on as True
    assert {"push", "pull_request"} <= set(triggers)
    job = document["jobs"]["selftest"]
    assert job["runs-on"].startswith("ubuntu")
    assert job["strategy"]["matrix"]["stability"] == ["release", "nightly"]
    steps = {step["name"]: step for step in job["steps"]}
    names = list(steps)
    assert names[0] == "Check out the repository" and steps[names[0]]["uses"].startswith("actions/checkout@")
    system = steps["Install the system libraries Slicer needs and Xvfb"]["run"]
    for package in ("xvfb", "libglu1-mesa", "libpulse-mainloop-glib0", "libnss3"):
        assert package in system
    download = steps["Download Slicer (${{ matrix.stability }})"]["run"]
    assert '"https://download.slicer.org/download?os=linux&stability=${{ matrix.stability }}"' in download
    assert "tar -xzf" in download and 'SLICER=$PWD/slicer/Slicer' in download
    torch = steps["Install torch (CPU build) into Slicer's Python"]["run"]
    assert torch.startswith("slicer/bin/PythonSlicer -m pip install") and "download.pytorch.org/whl/cpu" in torch
    selftest = steps["Install MONAI and the module's other packages, run the module's self-test under Xvfb"]
    assert selftest["run"] == "scripts/slicer-selftest --install"
    assert names.index("Download Slicer (${{ matrix.stability }})") < names.index(
        "Install torch (CPU build) into Slicer's Python") < names.index(selftest["name"])


def test_the_self_test_script_runs_what_slicer_s_own_python_unit_tests_run():
    text = SELFTEST.read_text()
    assert os.access(str(SELFTEST), os.X_OK)
    for needed in ('"$SLICER" --no-splash --testing --additional-module-paths "$MODULE_DIR"',
                   "slicer.testing.runUnitTest(['$MODULE_DIR'], 'MedAdvRobustness')", "xvfb-run",
                   '"$python_slicer" -m pip install -c "$constraints" $with_dependencies',
                   '"$python_slicer" -m pip install --no-deps -c "$constraints" $without_dependencies',
                   "--index-url https://download.pytorch.org/whl/cpu"):
        assert needed in text, needed


def selftest(tmp_path, slicer=None, *arguments, **environment):
    env = {key: value for key, value in os.environ.items() if key not in ("SLICER", "DISPLAY")}
    if slicer is not None:
        env["SLICER"] = str(slicer)
    env.update(environment)
    return subprocess.run(["bash", str(SELFTEST)] + list(arguments), capture_output=True, text=True, env=env,
                          timeout=120, cwd=str(tmp_path))


def test_the_self_test_script_says_what_is_wrong_with_slicer(tmp_path):
    unset = selftest(tmp_path)
    assert unset.returncode == 2
    assert "usage: SLICER=/path/to/Slicer scripts/slicer-selftest" in unset.stderr
    assert "slicer-selftest: error: SLICER is not set" in unset.stderr
    missing = selftest(tmp_path, tmp_path / "Slicer")
    assert missing.returncode == 2 and "is not an executable file" in missing.stderr
    not_slicer = tmp_path / "Slicer"
    not_slicer.write_text("#!/bin/sh\n")
    not_slicer.chmod(0o755)
    wrong = selftest(tmp_path, not_slicer)
    assert wrong.returncode == 2 and "no PythonSlicer next to" in wrong.stderr
    unknown = selftest(tmp_path, not_slicer, "--everything")
    assert unknown.returncode == 2 and "unknown argument: --everything" in unknown.stderr


def test_the_self_test_script_starts_slicer_in_testing_mode_with_the_module(tmp_path):
    """A stand-in for the Slicer launcher that prints its arguments, with this interpreter as bin/PythonSlicer."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "PythonSlicer").symlink_to(sys.executable)
    launcher = tmp_path / "Slicer"
    launcher.write_text('#!/bin/sh\nfor a in "$@"; do echo "arg: $a"; done\nexit 3\n')
    launcher.chmod(0o755)
    completed = selftest(tmp_path, launcher, DISPLAY=":99")
    assert completed.returncode == 3, completed.stderr  # Slicer's status is the script's
    module_dir = str(ROOT / "MedAdvRobustness")
    arguments = [line[5:] for line in completed.stdout.splitlines() if line.startswith("arg: ")]
    assert arguments == ["--no-splash", "--testing", "--additional-module-paths", module_dir, "--python-code",
                         "import slicer.testing; slicer.testing.runUnitTest(['{}'], 'MedAdvRobustness')".format(
                             module_dir)]
    assert "Its Python: {}".format(tmp_path / "bin" / "PythonSlicer") in completed.stdout
    if sys.platform.startswith("linux") and not any(
            os.access(os.path.join(folder, "xvfb-run"), os.X_OK) for folder in os.environ["PATH"].split(os.pathsep)):
        headless = selftest(tmp_path, launcher)
        assert headless.returncode == 2 and "no display (DISPLAY is not set) and no xvfb-run" in headless.stderr
