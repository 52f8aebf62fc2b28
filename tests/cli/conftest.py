import pytest


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """Very small demo splits for end-to-end command tests."""
    from sftkd_fastmri.data.demo import write_demo_data

    root = tmp_path_factory.mktemp("tiny_demo")
    write_demo_data(
        root,
        seed=1,
        image_size=(32, 24),
        num_coils=2,
        volumes_per_split={"train": 2, "val": 1, "test": 1},
        slices_per_volume={"train": 4, "val": 3, "test": 3},
        progress=False,
    )
    return root
