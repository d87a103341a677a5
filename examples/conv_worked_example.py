"""The course notes' worked convolution example, in graphc.

A 4x5 image and a 3x3 kernel; "convolution" in deep learning is
cross-correlation: slide the kernel over the image (no padding, stride 1) and
at each position sum the elementwise products.  The output is 2x3:

    [[10,  7,  4],
     [27, 24, 21]]

Run:  python examples/conv_worked_example.py [--render conv.png]
"""
import argparse

import numpy as np

import graphc as gc

IMAGE = np.array([[1, 2, 3, 4, 5],
                  [6, 7, 8, 9, 10],
                  [5, 4, 3, 2, 1],
                  [10, 9, 8, 7, 6]], dtype=np.float32)
KERNEL = np.array([[1, 0, -1],
                   [0, 1, -1],
                   [2, 0, 1]], dtype=np.float32)
EXPECTED = np.array([[10, 7, 4],
                     [27, 24, 21]], dtype=np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", metavar="FILE", help="also draw the graph (png/svg/pdf)")
    args = ap.parse_args(argv)

    # conv2d works on NCHW images and OIHW kernels: add the batch/channel axes.
    x = gc.input("image", (1, 1, 4, 5))
    k = gc.Parameter(KERNEL[None, None], name="kernel")
    y = gc.conv2d(x, k)                       # stride 1, no padding -> (1, 1, 2, 3)
    f = gc.compile([x], y)

    out = f(IMAGE[None, None])[0, 0]
    print("image:\n", IMAGE.astype(int))
    print("kernel:\n", KERNEL.astype(int))
    print("output:\n", out.astype(int))
    # the top-left entry by hand: sum(image[0:3, 0:3] * kernel)
    print("output[0, 0] = sum(image[0:3, 0:3] * kernel) =", int(np.sum(IMAGE[:3, :3] * KERNEL)))
    assert np.array_equal(out, EXPECTED), out
    print("matches the worked example: [[10, 7, 4], [27, 24, 21]]")

    if args.render:
        print("graph written to", gc.render(y, args.render, title="conv worked example"))


if __name__ == "__main__":
    main()
