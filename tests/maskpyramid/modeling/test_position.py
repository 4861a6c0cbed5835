"""position.py: the Gaussian is 1 at the root and 1/2 at radius rho, in image coordinates."""

import torch

from maskpyramid.modeling.position import gaussian_map, position_channels, window_cell_centres


def test_half_maximum_at_rho():
    xs = torch.tensor([[10.0, 14.0, 18.0]])
    ys = torch.tensor([[10.0]])
    g = gaussian_map(xs, ys, torch.tensor([[10.0, 10.0]]), torch.tensor([4.0]))
    torch.testing.assert_close(g[0, 0], torch.tensor([1.0, 0.5, 0.0625]))


def test_window_centres_and_channels_distinguish_roots():
    boxes = torch.tensor([[0.0, 0, 64, 64], [0.0, 0, 64, 64]])
    xs, _ = window_cell_centres(boxes, 4)
    torch.testing.assert_close(xs[0], torch.tensor([8.0, 24, 40, 56]))
    ch = position_channels(
        boxes, 4, torch.tensor([[8.0, 8.0], [56.0, 56.0]]), torch.tensor([16, 16]), 1.0
    )
    assert ch.shape == (2, 2, 4, 4)
    assert ch[0, 0, 0, 0] == 1 and ch[1, 0, 3, 3] == 1 and ch[0, 0, 3, 3] < 0.01
    assert ch[0, 1, 0, 1] < ch[0, 0, 0, 1]  # the root point is sharper than the position map


def test_offsets_are_relative_coordinates_in_root_strides():
    from maskpyramid.modeling.position import offset_channels

    boxes = torch.tensor([[0.0, 0, 64, 32]])
    off = offset_channels(boxes, 4, torch.tensor([[8.0, 4.0]]), torch.tensor([16]), 2.0)
    assert off.shape == (1, 2, 4, 4)
    # window cell centres x = 8, 24, 40, 56; y = 4, 12, 20, 28; divided by 2 * 16
    torch.testing.assert_close(off[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.5]))
    torch.testing.assert_close(off[0, 1, :, 0], torch.tensor([0.0, 0.25, 0.5, 0.75]))


def test_position_channels_are_the_gaussians_of_the_window_and_the_point_is_optional():
    boxes = torch.tensor([[0.0, 0, 64, 32], [10.0, 20, 50, 90]])
    roots = torch.tensor([[8.0, 4.0], [30.0, 41.0]])
    strides = torch.tensor([16, 8])
    ch = position_channels(boxes, 5, roots, strides, 1.5)
    xs, ys = window_cell_centres(boxes, 5)
    torch.testing.assert_close(ch[:, 0], gaussian_map(xs, ys, roots, 1.5 * strides.float()))
    torch.testing.assert_close(ch[:, 1], gaussian_map(xs, ys, roots, 0.25 * strides.float()))
    # without the root point (EXTRA_CHANNELS 1), the same position map, and nothing else
    alone = position_channels(boxes, 5, roots, strides, 1.5, point=False)
    assert alone.shape == (2, 1, 5, 5)
    assert torch.equal(alone[:, 0], ch[:, 0])
