import subprocess
import sys


def test_ingress_and_app_builder_import_no_torch_diffusers_or_pil():
    code = (
        "import sys, serve_app.ingress, serve_app.app\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'PIL', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
