//! Images into tensors: decoding (PNG, JPEG, DICOM) and the model's preprocessing
//! (`preprocessor_config.json`) come from `chartline-imaging`; this module turns the result
//! into a (1, 3, H, W) tensor and request errors that name the image.

use std::path::Path;

use candle_core::{Device, Tensor};

use chartline_imaging::{Limits, Preprocessor, decode};

use crate::backend::ImageInput;
use crate::error::{Error, Result};

/// Most pixels one image may decode to (50 megapixels: a 7000×7000 radiograph). Images are
/// decoded on the model's thread, so this bounds the time and memory one image can take.
pub const MAX_IMAGE_PIXELS: u64 = 50_000_000;

/// A model's image preprocessing with the decoding limits.
pub(crate) struct ImagePreprocessor {
    preprocessor: Preprocessor,
    limits: Limits,
}

impl ImagePreprocessor {
    /// Reads `preprocessor_config.json` (Hugging Face's image-processor keys).
    pub(crate) fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound(path.to_path_buf()));
        }
        let preprocessor = Preprocessor::from_json_file(path)
            .map_err(|e| Error::InvalidModel(format!("{}: {e}", path.display())))?;
        Ok(ImagePreprocessor {
            preprocessor,
            limits: Limits {
                max_pixels: MAX_IMAGE_PIXELS,
                ..Limits::default()
            },
        })
    }

    /// Output (height, width).
    pub(crate) fn size(&self) -> (usize, usize) {
        let (h, w) = self.preprocessor.size();
        (h as usize, w as usize)
    }

    /// Decodes and preprocesses `image`, the `index`-th of its request, into normalized
    /// pixels (1, 3, H, W). Bad images are request errors naming `images[index]`.
    pub(crate) fn pixels(
        &self,
        image: &ImageInput,
        index: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let decoded = decode(&image.data, image.content_type.as_deref(), &self.limits)
            .map_err(|e| {
                // The source is an id such as DocumentReference/abc: safe to name.
                let reason = match &image.source {
                    Some(src) => format!("({src}) {e}"),
                    None => e.to_string(),
                };
                Error::invalid(format!("images[{index}]"), reason)
            })?;
        let (h, w) = self.size();
        let values = self.preprocessor.preprocess(&decoded);
        tracing::debug!(
            image = index,
            width = decoded.width,
            height = decoded.height,
            "image preprocessed"
        );
        Ok(Tensor::from_vec(values, (1, 3, h, w), device)?)
    }
}
