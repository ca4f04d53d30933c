//! Hugging Face `preprocessor_config.json` semantics for the SigLIP-family processors.

use std::path::Path;

use serde_json::{Map, Value};

use crate::decode::DecodedImage;
use crate::error::ImageError;
use crate::resample::{Filter, resize_rgb8};

/// Largest accepted `size.height` / `size.width` in a config.
const MAX_MODEL_SIDE: u64 = 8192;

/// Model input preparation as `Gemma3ImageProcessor` / `SiglipImageProcessor` do it:
/// RGB, resize to a fixed `height x width` with Pillow's resampling, rescale (`x * 1/255`),
/// normalise (`(x - mean) / std`), channels first.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessor {
    height: u32,
    width: u32,
    filter: Filter,
    do_resize: bool,
    do_rescale: bool,
    rescale_factor: f64,
    do_normalize: bool,
    mean: [f32; 3],
    std: [f32; 3],
}

/// Defaults of the processor classes this crate reproduces (their `__init__` defaults).
struct ClassDefaults {
    resample: Option<i64>,
}

fn class_defaults(config: &Map<String, Value>) -> Result<ClassDefaults, ImageError> {
    match config.get("image_processor_type") {
        None | Some(Value::Null) => Ok(ClassDefaults { resample: None }),
        Some(Value::String(name)) => match name.as_str() {
            "Gemma3ImageProcessor" => Ok(ClassDefaults { resample: Some(2) }),
            "SiglipImageProcessor" => Ok(ClassDefaults { resample: Some(3) }),
            other if other.ends_with("Fast") => Err(ImageError::invalid_config(
                "image_processor_type",
                format!(
                    "`{other}` resizes with torchvision, whose results differ from Pillow's; \
                     only the Pillow-based `Gemma3ImageProcessor` and `SiglipImageProcessor` \
                     are reproduced"
                ),
            )),
            other => Err(ImageError::invalid_config(
                "image_processor_type",
                format!(
                    "`{other}` is not supported (supported: Gemma3ImageProcessor, \
                     SiglipImageProcessor)"
                ),
            )),
        },
        Some(_) => Err(ImageError::invalid_config(
            "image_processor_type",
            "must be a string",
        )),
    }
}

fn get_bool(config: &Map<String, Value>, key: &str, default: bool) -> Result<bool, ImageError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ImageError::invalid_config(key, "must be true or false")),
    }
}

fn get_f64(config: &Map<String, Value>, key: &str, default: f64) -> Result<f64, ImageError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| ImageError::invalid_config(key, "must be a finite number")),
    }
}

/// `image_mean` / `image_std`: a number or a list of 1 or 3 numbers.
fn get_triplet(config: &Map<String, Value>, key: &str) -> Result<[f32; 3], ImageError> {
    let invalid = || ImageError::invalid_config(key, "must be a number or a list of 3 numbers");
    let number = |v: &Value| {
        v.as_f64()
            .filter(|x| x.is_finite())
            .map(|x| x as f32)
            .ok_or_else(invalid)
    };
    match config.get(key) {
        None | Some(Value::Null) => Ok([0.5; 3]),
        Some(Value::Array(items)) => match items.as_slice() {
            [one] => Ok([number(one)?; 3]),
            [r, g, b] => Ok([number(r)?, number(g)?, number(b)?]),
            _ => Err(ImageError::invalid_config(
                key,
                format!("has {} values; an RGB image needs 3", items.len()),
            )),
        },
        Some(v) => Ok([number(v)?; 3]),
    }
}

fn get_size(config: &Map<String, Value>) -> Result<(u32, u32), ImageError> {
    let side = |obj: &Map<String, Value>, name: &str| -> Result<u32, ImageError> {
        let v = obj
            .get(name)
            .and_then(Value::as_u64)
            .filter(|v| (1..=MAX_MODEL_SIDE).contains(v))
            .ok_or_else(|| {
                ImageError::invalid_config(
                    "size",
                    format!("`{name}` must be an integer from 1 to {MAX_MODEL_SIDE}"),
                )
            })?;
        Ok(v as u32)
    };
    match config.get("size") {
        None | Some(Value::Null) => Ok((224, 224)),
        Some(Value::Object(obj)) if obj.contains_key("height") || obj.contains_key("width") => {
            Ok((side(obj, "height")?, side(obj, "width")?))
        }
        Some(Value::Object(obj)) => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            Err(ImageError::invalid_config(
                "size",
                format!(
                    "{{{}}} (aspect-preserving resizing) is not supported; give \
                     {{\"height\": H, \"width\": W}}",
                    keys.join(", ")
                ),
            ))
        }
        Some(_) => Err(ImageError::invalid_config(
            "size",
            "must be an object {\"height\": H, \"width\": W}",
        )),
    }
}

impl Preprocessor {
    /// Reads a `preprocessor_config.json`.
    ///
    /// # Errors
    /// [`ImageError::Io`] if the file cannot be read, else as [`Self::from_json_str`].
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ImageError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// Parses a `preprocessor_config.json`.
    ///
    /// Keys read: `image_processor_type` (`Gemma3ImageProcessor` defaults to bilinear,
    /// `SiglipImageProcessor` to bicubic; absent means `resample` must be given), `size`
    /// (`{"height", "width"}`, default 224x224), `resample` (Pillow numbering: 1 lanczos,
    /// 2 bilinear, 3 bicubic, 4 box, 5 hamming), `do_resize`, `do_rescale`,
    /// `rescale_factor` (default 1/255), `do_normalize`, `image_mean`, `image_std` (default
    /// 0.5 each), `do_convert_rgb` (decoded images are always RGB, so `false` changes
    /// nothing) and `do_pan_and_scan` (must be false). Other keys are ignored.
    ///
    /// # Errors
    /// [`ImageError::InvalidConfig`] naming the key that is missing, malformed or asks for
    /// something not implemented (`size.shortest_edge`, NEAREST resampling, pan and scan,
    /// torchvision-based "Fast" processors).
    pub fn from_json_str(json: &str) -> Result<Self, ImageError> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| ImageError::invalid_config("<json>", e.to_string()))?;
        let Value::Object(config) = value else {
            return Err(ImageError::invalid_config(
                "<json>",
                "top level must be an object",
            ));
        };
        let defaults = class_defaults(&config)?;
        let (height, width) = get_size(&config)?;
        let resample = match config.get("resample") {
            None | Some(Value::Null) => defaults.resample.ok_or_else(|| {
                ImageError::invalid_config(
                    "resample",
                    "missing, and no `image_processor_type` to take the default from",
                )
            })?,
            Some(v) => v
                .as_i64()
                .ok_or_else(|| ImageError::invalid_config("resample", "must be an integer"))?,
        };
        let filter = Filter::from_pil(resample).ok_or_else(|| {
            ImageError::invalid_config(
                "resample",
                format!(
                    "{resample} is not supported (Pillow numbering: 1 lanczos, 2 bilinear, \
                     3 bicubic, 4 box, 5 hamming; 0 nearest is not implemented)"
                ),
            )
        })?;
        if get_bool(&config, "do_pan_and_scan", false)? {
            return Err(ImageError::invalid_config(
                "do_pan_and_scan",
                "pan and scan (multiple crops per image) is not implemented",
            ));
        }
        get_bool(&config, "do_convert_rgb", true)?;
        let rescale_factor = get_f64(&config, "rescale_factor", 1.0 / 255.0)?;
        let std = get_triplet(&config, "image_std")?;
        if std.contains(&0.0) {
            return Err(ImageError::invalid_config(
                "image_std",
                "must not contain 0",
            ));
        }
        Ok(Self {
            height,
            width,
            filter,
            do_resize: get_bool(&config, "do_resize", true)?,
            do_rescale: get_bool(&config, "do_rescale", true)?,
            rescale_factor,
            do_normalize: get_bool(&config, "do_normalize", true)?,
            mean: get_triplet(&config, "image_mean")?,
            std,
        })
    }

    /// The model input size `(height, width)` from the config.
    pub fn size(&self) -> (u32, u32) {
        (self.height, self.width)
    }

    /// The resampling filter.
    pub fn filter(&self) -> Filter {
        self.filter
    }

    /// The output shape `[3, height, width]` for `img`: the configured size, or the image's
    /// own size when `do_resize` is false.
    pub fn output_shape(&self, img: &DecodedImage) -> [usize; 3] {
        if self.do_resize {
            [3, self.height as usize, self.width as usize]
        } else {
            [3, img.height as usize, img.width as usize]
        }
    }

    /// Resizes, rescales and normalises `img`, returning `3 x H x W` values, channels first
    /// (see [`Self::output_shape`]).
    ///
    /// The arithmetic follows the Hugging Face processor: the resize is done on `u8` by
    /// Pillow's algorithm, the rescale in `f64` then cast to `f32`, the normalisation in
    /// `f32`.
    ///
    /// # Panics
    /// When resizing an image whose `rgb.len()` is not `width * height * 3` or that has a
    /// zero dimension; [`decode`](crate::decode) never produces one.
    pub fn preprocess(&self, img: &DecodedImage) -> Vec<f32> {
        let [_, h, w] = self.output_shape(img);
        let resized;
        let pixels: &[u8] = if self.do_resize {
            resized = resize_rgb8(
                &img.rgb,
                img.width,
                img.height,
                self.width,
                self.height,
                self.filter,
            );
            &resized
        } else {
            &img.rgb
        };
        let plane = h * w;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in pixels.chunks_exact(3).take(plane).enumerate() {
            for c in 0..3 {
                let mut v = if self.do_rescale {
                    (f64::from(px[c]) * self.rescale_factor) as f32
                } else {
                    f32::from(px[c])
                };
                if self.do_normalize {
                    v = (v - self.mean[c]) / self.std[c];
                }
                out[c * plane + i] = v;
            }
        }
        out
    }
}
