"""Drawing primitives and the synthetic anatomy of the phantom (see data/phantom.py).

Every structure is painted onto a `Canvas` (CT in HU, activity in SUV, a tissue label map)
inside its own bounding box only, with partial-volume edges: big smooth structures use an
analytic soft edge (fraction = clip(0.5 - d / h, 0, 1), d the signed distance to the surface,
h the voxel size), lesions are sampled at 2x supersampling (8 sub-voxels per voxel) so that
their label (>= 50 % of sub-voxels inside) and partial volume are exact.

Coordinates are world mm in RAS+ (+x = Right, +y = Anterior, +z = Superior, nibabel
convention). Anatomical heights `za` are mm below the vertex of a
standard adult; `Body.z(za)` maps them to world z (compressed per preset so the FOV fits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Tissue ids of the label map (uint8). Only LESION is ever a label in SEG.
AIR, FAT, MUSCLE, VISCERAL_FAT, LUNG, CORTEX, MARROW, AORTA, LIVER, SPLEEN = range(10)
KIDNEY, RENAL_PELVIS, URETER, BOLUS, BLADDER, MYOCARDIUM, BLOOD = range(10, 17)
BRAIN_GM, BRAIN_WM, GLAND, BROWN_FAT, MUSCLE_FOCUS, BOWEL, BOWEL_AIR, CANAL, LESION = range(17, 26)

# Hot physiological uptake removed by the oracle of acceptance property 4 (docs/phantom.md,
# "Acceptance properties"). Besides the specification's list (brain, bladder, renal pelvis,
# heart = myocardium + blood pool, ureter boluses, brown fat) it holds the kidney cortex and the
# salivary glands / tonsils: their SUV (2.5-4.5) is above the oracle's fixed 2.5 in every study,
# so leaving them in only measures their volume.
ORACLE_EXCLUDED = (BRAIN_GM, BRAIN_WM, BLADDER, RENAL_PELVIS, KIDNEY, MYOCARDIUM, BLOOD, BOLUS,
                   BROWN_FAT, GLAND)
# Distractor groups whose connected components enter acceptance property 3.
DISTRACTOR_GROUPS = {
    "brain": (BRAIN_GM, BRAIN_WM), "bladder": (BLADDER,), "renal_pelvis": (RENAL_PELVIS,),
    "heart": (MYOCARDIUM,), "ureter_bolus": (BOLUS,), "brown_fat": (BROWN_FAT,),
    "kidney": (KIDNEY,), "gland": (GLAND,), "muscle_focus": (MUSCLE_FOCUS,), "bowel": (BOWEL,),
}


class Canvas:
    """The output grid and the maps being painted, all (X, Y, Z) float32 / uint8."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape, self.spacing = tuple(shape), np.asarray(spacing, dtype=np.float64)
        # voxel centres: x, y centred on 0, z from 0 (feet end) upwards
        self.origin = np.array([-(shape[0] - 1) / 2 * spacing[0], -(shape[1] - 1) / 2 * spacing[1],
                                spacing[2] / 2])
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.suv = np.zeros(shape, dtype=np.float32)
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.seg = np.zeros(shape, dtype=np.uint8)
        self.h = float(np.mean(spacing))  # voxel size used by soft edges

    @property
    def affine(self) -> np.ndarray:
        a = np.diag([*self.spacing, 1.0])
        a[:3, 3] = self.origin
        return a

    @property
    def height(self) -> float:
        return self.shape[2] * self.spacing[2]

    def box(self, lo, hi, ss: int = 1):
        """Index slices of the voxels whose centres lie in [lo, hi] (world mm) and their
        centre coordinates as broadcastable (n, 1, 1), (1, n, 1), (1, 1, n) arrays; with
        ss=2 each axis holds the 2 sub-voxel centres per voxel (length 2n). None if empty."""
        i0 = np.maximum(np.floor((np.asarray(lo) - self.origin) / self.spacing), 0).astype(int)
        i1 = np.minimum(np.ceil((np.asarray(hi) - self.origin) / self.spacing) + 1,
                        self.shape).astype(int)
        if np.any(i1 <= i0):
            return None
        sl = tuple(slice(a, b) for a, b in zip(i0, i1))
        axes = []
        for d in range(3):
            c = self.origin[d] + np.arange(i0[d], i1[d]) * self.spacing[d]
            if ss == 2:
                c = (c[:, None] + np.array([-0.25, 0.25]) * self.spacing[d]).ravel()
            shape = [1, 1, 1]
            shape[d] = c.size
            axes.append(c.reshape(shape).astype(np.float32))
        return sl, axes

    def paint(self, sl, frac: np.ndarray, tissue: int, hu, suv) -> None:
        """Partial-volume compositing: value <- value + frac * (new - value)."""
        if frac is None:
            return
        v = self.hu[sl]
        v += frac * (np.float32(hu) - v) if np.isscalar(hu) else frac * (hu - v)
        v = self.suv[sl]
        v += frac * (np.float32(suv) - v) if np.isscalar(suv) else frac * (suv - v)
        self.tissue[sl][frac >= 0.5] = tissue


def soft(d: np.ndarray, h: float) -> np.ndarray:
    """Fraction of a voxel of size h inside a surface at signed distance d (negative inside)."""
    return np.clip(0.5 - d / h, 0.0, 1.0).astype(np.float32)


def ellipsoid(cv: Canvas, c, r, angle: float = 0.0, grow: float = 0.0):
    """Soft-edged ellipsoid, centre c, semi-axes r (mm), rotated by `angle` (rad) about z.
    `grow` (mm) offsets the surface outwards. Returns (slices, fraction) or (None, None)."""
    r = np.asarray(r, dtype=np.float64) + grow
    ext = r.max() + cv.h
    b = cv.box(np.asarray(c) - ext, np.asarray(c) + ext)
    if b is None:
        return None, None
    sl, (x, y, z) = b
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    if angle:
        ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
    ux, uy, uz = dx / r[0], dy / r[1], dz / r[2]
    q = np.sqrt(ux * ux + uy * uy + uz * uz)
    # first-order distance to the surface: (q - 1) / |grad q|, |grad q| = |u / r| / q
    g = np.sqrt((ux / r[0]) ** 2 + (uy / r[1]) ** 2 + (uz / r[2]) ** 2)
    d = (q - 1) * q / np.maximum(g, 1e-6)
    f = soft(d, cv.h)
    return (sl, f) if f.any() else (None, None)


def capsule(cv: Canvas, p0, p1, radius: float):
    """Soft-edged tube of `radius` around the segment p0-p1 (mm)."""
    p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    ext = radius + cv.h
    b = cv.box(np.minimum(p0, p1) - ext, np.maximum(p0, p1) + ext)
    if b is None:
        return None, None
    sl, (x, y, z) = b
    v = p1 - p0
    vv = max(float(v @ v), 1e-9)
    dx, dy, dz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((dx * v[0] + dy * v[1] + dz * v[2]) / vv, 0, 1)
    d = np.sqrt((dx - t * v[0]) ** 2 + (dy - t * v[1]) ** 2 + (dz - t * v[2]) ** 2) - radius
    f = soft(d, cv.h)
    return (sl, f) if f.any() else (None, None)


def slab_ellipses(cv: Canvas, z0: float, z1: float, za, a, b, cx: float = 0.0, cy: float = 0.0):
    """Stack of axial ellipses between world z0 and z1, semi-axes interpolated from the
    knots (za: world z, a, b: mm). Used for the body outline (trunk, neck, head, thighs)."""
    bx = cv.box((-1e4, -1e4, z0), (1e4, 1e4, z1))
    if bx is None:
        return None, None
    sl, (x, y, z) = bx
    aa = np.interp(z, za, a).astype(np.float32)  # (1, 1, nz)
    bb = np.interp(z, za, b).astype(np.float32)
    ux, uy = (x - cx) / aa, (y - cy) / bb
    q = np.sqrt(ux * ux + uy * uy)
    g = np.sqrt((ux / aa) ** 2 + (uy / bb) ** 2)
    f = soft((q - 1) * q / np.maximum(g, 1e-6), cv.h)
    f[..., (z[0, 0] < z0) | (z[0, 0] > z1)] = 0
    return (sl, f) if f.any() else (None, None)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def lesion_fraction(cv: Canvas, c, radius: float, rng: np.random.Generator, core: float = 0.0):
    """2x-supersampled lesion: an ellipsoid (aspect 0.7-1.3) with a smooth random surface,
    randomly rotated. Returns (slices, fraction, core_fraction or None)."""
    axes = radius * rng.uniform(0.7, 1.3, size=3)
    axes *= radius / np.cbrt(axes.prod())  # keep the equivalent-sphere radius
    rot = random_rotation(rng).astype(np.float32)
    # smooth surface: r(n) = 1 + a.n + 0.08 sin(3 k.n + phi), n the unit direction
    a_vec = rng.normal(0, 0.06, 3).astype(np.float32)
    k_vec = rng.normal(0, 1, 3).astype(np.float32)
    phi = np.float32(rng.uniform(0, 2 * np.pi))
    ext = axes.max() * 1.3 + cv.h
    b = cv.box(np.asarray(c) - ext, np.asarray(c) + ext, ss=2)
    if b is None:
        return None, None, None
    sl, (x, y, z) = b
    d = [x - c[0], y - c[1], z - c[2]]
    u = [(rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2]) / axes[i] for i in range(3)]
    q = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    n = [ui / np.maximum(q, 1e-6) for ui in u]
    rim = 1 + a_vec[0] * n[0] + a_vec[1] * n[1] + a_vec[2] * n[2] + \
        0.08 * np.sin(3 * (k_vec[0] * n[0] + k_vec[1] * n[1] + k_vec[2] * n[2]) + phi)
    inside = (q <= rim).astype(np.float32)
    frac = _down2(inside)
    core_frac = _down2((q <= core * rim).astype(np.float32)) if core > 0 else None
    return sl, frac, core_frac


def _down2(a: np.ndarray) -> np.ndarray:
    """Mean over 2x2x2 sub-voxels: (2X, 2Y, 2Z) -> (X, Y, Z)."""
    X, Y, Z = (s // 2 for s in a.shape)
    return a.reshape(X, 2, Y, 2, Z, 2).mean(axis=(1, 3, 5))


def smooth_field(rng: np.random.Generator, shape, amplitude: float) -> np.ndarray:
    """Low-frequency multiplicative texture 1 + amplitude * N(0, 1) (smooth, zero mean)."""
    coarse = rng.normal(0, 1, size=(6, 6, 6)).astype(np.float32)
    f = ndimage.zoom(coarse, [s / 6 for s in shape], order=1, mode="nearest")[
        :shape[0], :shape[1], :shape[2]]
    f = np.pad(f, [(0, s - fs) for s, fs in zip(shape, f.shape)], mode="edge")
    return 1 + amplitude * f / max(float(f.std()), 1e-6)


@dataclass
class Body:
    """Per-patient geometry: anatomical heights `za` (mm below the vertex) -> world z, scales."""

    kz: float          # axial compression (world mm per anatomical mm)
    za_bottom: float   # anatomical height at world z = 0 (the feet end of the FOV)
    s_trunk: float     # in-plane scale of the trunk (preset scale x patient scale 0.85-1.2)
    s_head: float      # in-plane scale of head and neck (varies less between patients)
    s_organ: float     # in-plane scale of organs
    fat: float         # subcutaneous fat thickness of the trunk (mm)

    # body outline knots: anatomical height, LR and AP semi-axes (mm, before scaling)
    KNOTS = np.array([
        [10, 50, 62], [40, 72, 88], [85, 78, 96], [140, 72, 88], [170, 52, 58], [245, 58, 62],
        [285, 175, 108], [400, 168, 115], [550, 152, 120], [700, 165, 115], [850, 175, 110],
        [925, 172, 105], [1100, 172, 105]], dtype=np.float64)

    def z(self, za):
        return (self.za_bottom - np.asarray(za, dtype=np.float64)) * self.kz

    def za(self, z):
        return self.za_bottom - np.asarray(z, dtype=np.float64) / self.kz

    def outline(self, za):
        """LR and AP semi-axes (mm) of the body outline at anatomical height(s) za."""
        k = self.KNOTS
        w = np.clip((np.asarray(za, dtype=np.float64) - 245) / 40, 0, 1)  # 0 head/neck, 1 trunk
        scale = (1 - w) * self.s_head + w * self.s_trunk
        return np.interp(za, k[:, 0], k[:, 1]) * scale, np.interp(za, k[:, 0], k[:, 2]) * scale

    def point(self, fx: float, fy: float, za: float) -> np.ndarray:
        """World point at fractions (fx, fy) of the local outline semi-axes, height za."""
        a, b = self.outline(za)
        return np.array([fx * a, fy * b, float(self.z(za))])


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _organ(body: Body, rp: np.random.Generator, fx, fy, za, r, size_jitter=0.1):
    """Centre (world mm, +-1 cm jitter) and semi-axes (+-10 %) of an organ whose nominal
    centre is at outline fractions (fx, fy), height za and nominal semi-axes r (mm)."""
    c = body.point(fx, fy, za) + rp.uniform(-10, 10, 3) * np.array(
        [body.s_organ, body.s_organ, body.kz])
    j = rp.uniform(1 - size_jitter, 1 + size_jitter, 3)
    return c, np.array([r[0] * body.s_organ, r[1] * body.s_organ, r[2] * body.kz]) * j


def draw_body(cv: Canvas, body: Body, rs: np.random.Generator) -> dict:
    """Body outline (fat), muscle layer, visceral fat cavity, thighs. Returns tissue values."""
    v = {"fat_suv": _u(rs, 0.2, 0.4), "muscle_suv": _u(rs, 0.6, 1.0),
         "pet_scale": _u(rs, 0.85, 1.15)}  # global calibration, applied in image formation
    za = np.linspace(0, 1100, 221)
    z = body.z(za)[::-1]
    a, b = (x[::-1] for x in body.outline(za))
    top_z, crotch = body.z(5.0), float(body.z(925.0))
    # subcutaneous fat shell: thinner in head and neck
    fat = np.where(za[::-1] < 260, 4 * body.s_head, body.fat)
    wall = np.where(za[::-1] < 260, 8 * body.s_head, 16 * body.s_trunk)
    cavity = (body.z(900.0), body.z(165.0))  # neck to pelvis: visceral / mediastinal fat
    for inset, tissue, hu, suv, (z_lo, z_hi) in [
            (0, FAT, -100, v["fat_suv"], (crotch, top_z)),
            (fat, MUSCLE, 45, v["muscle_suv"], (crotch, top_z)),
            (fat + wall, VISCERAL_FAT, -100, v["fat_suv"], cavity)]:
        sl, f = slab_ellipses(cv, z_lo, z_hi, z, a - inset, b - inset)
        cv.paint(sl, f, tissue, hu, suv)
    # thighs below the crotch, each with fat, muscle and a femur
    ta, _ = body.outline(925.0)
    for side in (-1, 1):
        cx = side * 0.5 * ta
        r = 0.47 * ta
        for inset, tissue, hu, suv in [(0, FAT, -100, v["fat_suv"]),
                                       (0.6 * body.fat, MUSCLE, 45, v["muscle_suv"])]:
            sl, f = slab_ellipses(cv, -1e3, crotch + r * 0.3, [-1e3, 1e3], [r - inset] * 2,
                                  [r * 0.9 - inset] * 2, cx=cx)
            cv.paint(sl, f, tissue, hu, suv)
    return v


def draw_skeleton(cv: Canvas, body: Body, rp: np.random.Generator, rs: np.random.Generator,
                  v: dict, geo: dict) -> None:
    """Spine (vertebral bodies with cortex and discs, spinal canal), iliac wings, femurs,
    skull. Marrow SUV 1-2, cancellous 200-300 HU, cortex ~800 HU."""
    v["marrow_suv"] = marrow = _u(rs, 1.0, 1.7)  # spec 1-2; kept under SUV 2.5 after scaling
    cancellous = _u(rs, 200, 300)
    s = body.s_organ
    za_top, za_bot = 165.0, 880.0
    # vertebrae: height 25 mm, disc 5 mm (anatomical), radius 18 mm (11 mm in the neck)
    for za0 in np.arange(za_top, za_bot, 30.0):
        r = (11 if za0 < 270 else 18) * s
        fy = -0.55 if za0 > 280 else -0.2
        c0 = body.point(0, fy, za0 + 25)
        c1 = body.point(0, fy, za0)
        sl, f = capsule(cv, c0, c1, r)
        cv.paint(sl, f, CORTEX, 800, marrow)
        sl, f = capsule(cv, c0, c1, r - 3)
        cv.paint(sl, f, MARROW, cancellous, marrow)
        # spinal canal behind the body
        sl, f = capsule(cv, c0 - [0, r + 9 * s, 0], c1 - [0, r + 9 * s, 0], 8 * s)
        cv.paint(sl, f, CANAL, 10, 0.5)
    geo["spine"] = (body.point(0, -0.55, za_bot), body.point(0, -0.55, 285.0), 18 * s)
    # iliac wings and femurs
    for side in (-1, 1):
        c, r = _organ(body, rp, side * 0.55, -0.3, 760, (14, 50, 55))
        for grow, t, hu in [(0, CORTEX, 800), (-3, MARROW, cancellous)]:
            sl, f = ellipsoid(cv, c, r, angle=side * 0.5, grow=grow)
            cv.paint(sl, f, t, hu, marrow)
        geo.setdefault("iliac", []).append((c, r))
        ta, _ = body.outline(925.0)
        p0 = np.array([side * 0.5 * ta, 0, body.z(870.0)])
        p1 = np.array([side * 0.5 * ta, 0, body.z(1100.0)])
        for rad, t, hu in [(13 * s, CORTEX, 800), (8 * s, MARROW, cancellous)]:
            sl, f = capsule(cv, p0, p1, rad)
            cv.paint(sl, f, t, hu, marrow * 0.8)


def draw_head_neck(cv: Canvas, body: Body, rs: np.random.Generator, v: dict) -> None:
    """Skull, brain (grey-matter shell SUV 8-13, white matter 3-5), salivary glands, tonsils."""
    s = body.s_head
    c = body.point(0, 0, 85.0)
    r = np.array([68 * s, 84 * s, 62 * body.kz])
    for grow, t, hu, suv in [(7 * s, CORTEX, 800, 0.8), (0, BRAIN_GM, 38, _u(rs, 8, 13)),
                             (-5 * s, BRAIN_WM, 30, _u(rs, 3, 5))]:
        sl, f = ellipsoid(cv, c, r, grow=grow)
        cv.paint(sl, f, t, hu, suv)
    gland = _u(rs, 2.5, 4.5)
    for side in (-1, 1):
        for fx, fy, za, rr in [(0.75, 0.0, 185, (11, 15, 18)), (0.5, 0.45, 220, (9, 9, 9)),
                               (0.22, 0.3, 200, (6, 7, 9))]:  # parotid, submandibular, tonsil
            cg = body.point(side * fx, fy, za)
            sl, f = ellipsoid(cv, cg, (rr[0] * s, rr[1] * s, rr[2] * body.kz))
            cv.paint(sl, f, GLAND, 40, gland * _u(rs, 0.85, 1.15))


def draw_organs(cv: Canvas, body: Body, rp: np.random.Generator, rs: np.random.Generator,
                v: dict, geo: dict, contrast: bool) -> None:
    """Lungs, aorta, heart, liver, spleen, kidneys with renal pelvis, ureters, bladder.
    Values from docs/phantom.md, "Anatomy" (HU plain / contrast)."""
    # liver SUV 1.5-1.85 *after* the global PET scale (v["pet_scale"]): with 8-12 % noise
    # its voxels stay below the SUV 2.5 of property 4, so liver noise is not a lesion
    v["liver_suv"] = liver = _u(rs, 1.5, 1.85) / v["pet_scale"]
    lung_hu = -850 + _u(rs, -40, 40)
    for side in (-1, 1):
        c, r = _organ(body, rp, side * 0.45, -0.05, 375, (62, 78, 95))
        sl, f = ellipsoid(cv, c, r)
        cv.paint(sl, f, LUNG, lung_hu, _u(rs, 0.4, 0.7))
        geo.setdefault("lung", []).append((c, r))
    blood_hu = 180 if contrast else 40
    # blood pool below the liver, as in FDG PET (docs/phantom.md "Anatomy": aorta 1.5-2.2;
    # here tied to the liver so that it stays under the SUV 2.5 of property 4)
    blood_suv = _u(rs, 0.8, 0.95) * v["liver_suv"]
    # aorta: r 12 mm, left-anterior of the spine, bifurcation (za 700) to the arch (za 390)
    p0, p1 = body.point(-0.08, -0.25, 700), body.point(-0.08, -0.2, 390)
    p0[:2] += rp.uniform(-6, 6, 2) * body.s_organ
    geo["aorta"] = (p0, p1, 12 * body.s_organ)
    sl, f = capsule(cv, p0, p1, 12 * body.s_organ)
    cv.paint(sl, f, AORTA, blood_hu, blood_suv)
    # heart: 1 cm myocardial shell around the blood pool; uptake bimodal (fasting or not)
    c, r = _organ(body, rp, -0.15, 0.25, 445, (52, 45, 55))
    myo = _u(rs, 1.5, 4.0) if rs.random() < 0.6 else _u(rs, 6.0, 15.0)
    sl, f = ellipsoid(cv, c, r, angle=0.4)
    cv.paint(sl, f, MYOCARDIUM, 40, myo)
    sl, f = ellipsoid(cv, c, r, angle=0.4, grow=-10 * body.s_organ)
    cv.paint(sl, f, BLOOD, blood_hu, blood_suv)
    geo["heart"] = (c, r)
    # liver with mild texture; spleen
    c, r = _organ(body, rp, 0.38, 0.02, 540, (88, 72, 75))
    sl, f = ellipsoid(cv, c, r, angle=-0.2)
    if sl is not None:
        cv.paint(sl, f, LIVER, 110 if contrast else 55, liver * smooth_field(rs, f.shape, 0.05))
    geo["liver"] = (c, r)
    c, r = _organ(body, rp, -0.58, -0.3, 525, (32, 52, 55))
    sl, f = ellipsoid(cv, c, r, angle=0.5)
    cv.paint(sl, f, SPLEEN, 120 if contrast else 45, liver * _u(rs, 0.85, 1.0))
    geo["spleen"] = (c, r)
    # bladder 4-9 cm, SUV log-uniform 5-60
    d = _u(rs, 40, 90)
    c, _ = _organ(body, rp, 0, 0.25, 850, (1, 1, 1))
    r = np.array([d / 2 * body.s_organ, d / 2 * 0.85 * body.s_organ, d / 2 * body.kz])
    sl, f = ellipsoid(cv, c, r)
    cv.paint(sl, f, BLADDER, 5, float(np.exp(rs.uniform(np.log(5), np.log(60)))))
    geo["bladder"] = (c, r)
    # kidneys (cortex), renal pelvis 1-2 cm, ureters with hot boluses down to the bladder
    geo["ureter"] = []
    for side in (-1, 1):
        c, r = _organ(body, rp, side * 0.38, -0.42, 600, (28, 24, 52))
        sl, f = ellipsoid(cv, c, r, angle=side * 0.3)
        cv.paint(sl, f, KIDNEY, 160 if contrast else 35, _u(rs, 2.5, 4.0))
        geo.setdefault("kidney", []).append((c, r))
        pc = c - np.array([side * 10 * body.s_organ, -4 * body.s_organ, 0])
        rr = _u(rs, 5, 10) * np.array([body.s_organ, body.s_organ, max(body.kz, 0.5)])
        sl, f = ellipsoid(cv, pc, rr)
        cv.paint(sl, f, RENAL_PELVIS, _u(rs, 0, 15), _u(rs, 5, 25))
        path = [pc, body.point(side * 0.2, -0.35, 690), body.point(side * 0.3, -0.1, 800),
                geo["bladder"][0] + [side * geo["bladder"][1][0] * 0.8, 0, 0]]
        path = [p + np.r_[rp.uniform(-5, 5, 2) * body.s_organ, 0] for p in path]
        geo["ureter"].append(path)
        draw_ureter(cv, body, rs, path)


def draw_ureter(cv: Canvas, body: Body, rs: np.random.Generator, path) -> None:
    """5-6 mm tube, SUV ~1, with 0-3 hot boluses (1-3 cm long, SUV 4-15): node mimics."""
    radius = _u(rs, 2.5, 3.0)
    suv = _u(rs, 0.8, 1.2)
    for p0, p1 in zip(path[:-1], path[1:]):
        sl, f = capsule(cv, p0, p1, radius)
        cv.paint(sl, f, URETER, 30, suv)
    seg_len = [np.linalg.norm(p1 - p0) for p0, p1 in zip(path[:-1], path[1:])]
    for _ in range(rs.integers(0, 4)):
        k = int(rs.integers(0, len(seg_len)))
        p0, p1 = path[k], path[k + 1]
        direction = (p1 - p0) / max(seg_len[k], 1e-6)
        length = _u(rs, 10, 30)
        t = _u(rs, 0, max(seg_len[k] - length, 0))
        b0 = p0 + direction * t
        sl, f = capsule(cv, b0, b0 + direction * min(length, seg_len[k]), radius + 0.5)
        cv.paint(sl, f, BOLUS, 30, _u(rs, 4, 15))


def draw_distractors(cv: Canvas, body: Body, rs: np.random.Generator, v: dict, geo: dict,
                     info: dict) -> None:
    """Optional distractors, p = 0.2 each: brown fat foci, focal muscle uptake, hot bowel.
    Plain bowel loops (SUV 1.5-2.5) are always present: they shape the abdominal CT."""
    s = body.s_organ
    info["brown_fat"] = bool(rs.random() < 0.2)
    if info["brown_fat"]:  # supraclavicular, cervical and paravertebral fat
        for _ in range(rs.integers(2, 7)):
            side = rs.choice([-1, 1])
            za = _u(rs, 230, 330)
            c = body.point(side * _u(rs, 0.3, 0.7), _u(rs, -0.4, 0.1), za)
            r = _u(rs, 4, 8)
            sl, f = ellipsoid(cv, c, (r * s, r * s, r * 1.5 * body.kz))
            cv.paint(sl, f, BROWN_FAT, _u(rs, -90, -60), _u(rs, 2, 10))
    info["muscle_focus"] = bool(rs.random() < 0.2)
    if info["muscle_focus"]:  # e.g. psoas or paraspinal muscle, elongated
        side = rs.choice([-1, 1])
        za = _u(rs, 600, 820)
        c = body.point(side * 0.25, -0.6, za)
        sl, f = ellipsoid(cv, c, (10 * s, 10 * s, 40 * body.kz))
        cv.paint(sl, f, MUSCLE_FOCUS, 50, _u(rs, 2, 5))
    info["hot_bowel"] = bool(rs.random() < 0.2)
    for i in range(int(rs.integers(4, 9))):
        hot = info["hot_bowel"] and i == 0  # one hot loop
        c = body.point(_u(rs, -0.5, 0.5), _u(rs, 0.0, 0.6), _u(rs, 640, 790))
        r = _u(rs, 7, 11) if hot else _u(rs, 10, 18)
        c1 = c + np.r_[rs.normal(0, 25, 2) * s, rs.normal(0, 15) * body.kz]
        sl, f = capsule(cv, c, c1, r * s)
        cv.paint(sl, f, BOWEL, _u(rs, 20, 40), _u(rs, 1.5, 5.0) if hot else _u(rs, 1.0, 1.6))
        if rs.random() < 0.6:  # air pocket
            sl, f = ellipsoid(cv, c, (r * 0.5 * s,) * 2 + (r * 0.5 * body.kz,))
            cv.paint(sl, f, BOWEL_AIR, -1000, 0.0)


SITES = ("node", "lung", "liver", "bone", "soft")
SITE_P = (0.45, 0.20, 0.15, 0.10, 0.10)
NODE_REGIONS = ("cervical", "axillary", "mediastinal", "para_aortic", "iliac", "inguinal")
P_LOW_CONTRAST = 0.6   # of liver and bone lesions: 0.6 x 25 % = 15 % of all lesions
P_NEAR_DISTRACTOR = 0.25


def _in_ellipsoid(rs: np.random.Generator, c, r, shrink: float) -> np.ndarray:
    u = rs.normal(size=3)
    u *= rs.random() ** (1 / 3) / np.linalg.norm(u)
    return c + u * r * shrink


def _place(cv: Canvas, body: Body, rs: np.random.Generator, geo: dict, site: str, radius: float):
    """A lesion centre (world mm) and a sub-site name for `site`."""
    s, sgn = body.s_organ, float(rs.choice([-1, 1]))
    if site == "lung":
        c, r = geo["lung"][int(rs.integers(2))]
        return _in_ellipsoid(rs, c, r, 0.65), "lung"
    if site == "liver":
        return _in_ellipsoid(rs, *geo["liver"], 0.6), "liver"
    if site == "bone":
        if rs.random() < 0.7:
            p0, p1, _ = geo["spine"]
            return p0 + (p1 - p0) * rs.random(), "bone:spine"
        c, r = geo["iliac"][int(rs.integers(2))]
        return _in_ellipsoid(rs, c, r, 0.5), "bone:iliac"
    if site == "soft":
        za, th = _u(rs, 300, 860), _u(rs, 0, 2 * np.pi)
        a, b = body.outline(za)
        inset = body.fat / 2 if rs.random() < 0.5 else body.fat + 8 * s
        return np.array([(a - inset) * np.cos(th), (b - inset) * np.sin(th), body.z(za)]), "soft"
    if rs.random() < P_NEAR_DISTRACTOR:  # a node 1-3 cm from a hot distractor
        which = str(rs.choice(["kidney", "ureter", "bladder", "heart"]))
        gap = _u(rs, 10, 30) + radius
        th = _u(rs, 0, 2 * np.pi)
        n = np.array([np.cos(th), np.sin(th), 0.0])
        if which == "ureter":
            path = geo["ureter"][int(rs.integers(2))]
            k = int(rs.integers(len(path) - 1))
            p = path[k] + (path[k + 1] - path[k]) * rs.random()
            return p + n * (gap + 3), "node:near_ureter"
        if which == "kidney":
            c, r = geo["kidney"][int(rs.integers(2))]
        else:
            c, r = geo[which]
        return c + n * (np.hypot(r[0] * n[0], r[1] * n[1]) + gap), f"node:near_{which}"
    region = NODE_REGIONS[int(rs.integers(len(NODE_REGIONS)))]
    if region == "para_aortic":
        p0, p1, _ = geo["aorta"]
        p = p0 + (p1 - p0) * _u(rs, 0, 0.35)
        return p + np.array([sgn * _u(rs, 20, 32) * s, _u(rs, -8, 8) * s, 0]), "node:para_aortic"
    fx, fy, za = {
        "cervical": ((0.45, 0.8), (-0.3, 0.3), (180, 250)),
        "axillary": ((0.72, 0.86), (-0.2, 0.3), (290, 340)),
        "mediastinal": ((-0.12, 0.12), (0.0, 0.2), (360, 410)),
        "iliac": ((0.25, 0.45), (-0.1, 0.15), (770, 840)),
        "inguinal": ((0.3, 0.55), (0.55, 0.8), (875, 905)),
    }[region]
    mult = 1.0 if region == "mediastinal" else sgn
    return body.point(mult * _u(rs, *fx), _u(rs, *fy), _u(rs, *za)), f"node:{region}"


def draw_lesions(cv: Canvas, body: Body, rs: np.random.Generator, v: dict, geo: dict,
                 n: int) -> list[dict]:
    """Paint n lesions (the only labelled objects) and write them into cv.seg.
    Returns per-lesion metadata plus the private key "_mask" = (slices, bool mask)."""
    plans = []
    for _ in range(n):
        site = SITES[int(rs.choice(len(SITES), p=SITE_P))]
        diameter = float(np.exp(rs.uniform(np.log(6), np.log(30))))
        radius = diameter / 2
        for _attempt in range(50):
            c, where = _place(cv, body, rs, geo, site, radius)
            lo = cv.origin + radius
            hi = cv.origin + (np.array(cv.shape) - 1) * cv.spacing - radius
            if np.all(c >= lo) and np.all(c <= hi):
                break
            site = SITES[int(rs.choice(len(SITES), p=SITE_P))]
        else:
            continue  # nothing fits the field of view (tiny unit grids only)
        low = site in ("liver", "bone") and rs.random() < P_LOW_CONTRAST
        if low:  # 1.4-2 x the local background
            suv = _u(rs, 1.4, 2.0) * (v["liver_suv"] if site == "liver" else v["marrow_suv"])
        else:
            # lognormal, median 6, sigma_log 0.6, clipped to [4, 30] (docs/phantom.md "Lesions":
            # [2.5, 30]; the floor of 4 is the prototype's variant: below it only low-contrast
            # lesions)
            suv = float(np.clip(6 * np.exp(rs.normal(0, 0.6)), 4.0, 30))
        hu = {"node": _u(rs, 30, 50), "lung": _u(rs, 0, 40), "liver": _u(rs, 20, 40),
              "soft": _u(rs, 35, 50)}.get(site)
        if site == "bone":
            hu = _u(rs, 50, 150) if rs.random() < 0.5 else _u(rs, 500, 900)
        necrotic = diameter > 20 and rs.random() < 0.3
        plans.append((site, where, c, diameter, suv, hu, low, necrotic))
    # nodes sit in fat: a thin fat halo gives their CT signature (all halos first, so that
    # no halo paints over another lesion)
    for site, _, c, diameter, *_ in plans:
        if site == "node":
            sl, f = ellipsoid(cv, c, (diameter / 2 + 4,) * 3)
            cv.paint(sl, f, VISCERAL_FAT, -100, v["fat_suv"])
    lesions = []
    for site, where, c, diameter, suv, hu, low, necrotic in plans:
        sl, frac, core = lesion_fraction(cv, c, diameter / 2, rs, core=0.4 if necrotic else 0.0)
        if sl is None:
            continue
        cv.paint(sl, frac, LESION, hu, suv)
        if core is not None:  # necrotic core: inner 40 % of the radius at 30 % uptake
            cv.paint(sl, core, LESION, 20, 0.3 * suv)
        mask = frac >= 0.5
        if not mask.any():  # keep a label for every lesion: honest false negatives
            mask = frac == frac.max()
        cv.seg[sl][mask] = 1
        cv.tissue[sl][mask] = LESION
        lesions.append({
            "centre_mm": [round(float(x), 2) for x in c],
            "centre_voxel": [int(round(x)) for x in (c - cv.origin) / cv.spacing],
            "diameter_mm": round(diameter, 2),
            "volume_ml": round(float(mask.sum() * np.prod(cv.spacing) / 1000), 4),
            "true_suvmax": round(suv, 3), "site": where, "low_contrast": bool(low),
            "necrotic": bool(necrotic), "ct_hu": round(float(hu), 1), "_mask": (sl, mask)})
    return lesions
