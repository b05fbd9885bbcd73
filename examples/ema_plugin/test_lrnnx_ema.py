"""The plugin's own tests: lrnnx-zoo's layer contract kit over the layer it registers, one test case
per check (`pytest test_lrnnx_ema.py`, with the plugin installed). The same in one call, without
pytest: python -c "from lrnnx_zoo.testing import check_layer; check_layer('ema')"."""

from lrnnx_zoo.testing import LayerCheck, parametrize_with_checks


@parametrize_with_checks("ema")
def test_lrnnx_zoo_contract(check: LayerCheck) -> None:
    check()
