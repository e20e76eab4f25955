//! The three generation modes, decided by which inputs an image has.

use super::ImageJob;

/// What making an image does: txt2img from noise, img2img from a source image, or inpainting
/// a source image's masked region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Txt2Img,
    Img2Img,
    Inpaint,
}

impl Mode {
    /// The mode of an image with or without a source image and a mask (a mask without a source
    /// image has nothing to apply to).
    pub fn of(has_source: bool, has_mask: bool) -> Self {
        match (has_source, has_mask) {
            (false, _) => Self::Txt2Img,
            (true, false) => Self::Img2Img,
            (true, true) => Self::Inpaint,
        }
    }
}

impl ImageJob {
    pub fn mode(&self) -> Mode {
        let source = self.source.as_ref();
        Mode::of(source.is_some(), source.is_some_and(|s| s.mask.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::pipelines::SourceImage;

    fn job(source: Option<SourceImage>) -> ImageJob {
        ImageJob {
            prompt: "a cat".into(),
            negative_prompt: String::new(),
            seed: 0,
            source,
        }
    }

    #[test]
    fn the_inputs_decide_the_mode() {
        let pixels = Tensor::zeros((3, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(job(None).mode(), Mode::Txt2Img);
        let source = |mask: Option<Tensor>| {
            Some(SourceImage {
                pixels: pixels.clone(),
                mask,
            })
        };
        assert_eq!(job(source(None)).mode(), Mode::Img2Img);
        assert_eq!(job(source(Some(mask))).mode(), Mode::Inpaint);
        assert_eq!(
            Mode::of(false, true),
            Mode::Txt2Img,
            "a mask alone does nothing"
        );
    }
}
