"""
A score of one's own, in one file (docs/forking.md): the student's predictive entropy instead of its loss,

  S_H(x, y) = H(softmax(theta_k(x))) - omega * CE(theta*(x), y)

High S_H: the current student is unsure what x is (whatever it answers), while the reference theta* still recognises
it as y. `python distill.py --score entropy` guides every stage with it; the stage loop, the preflight, the dry run
and a resume's settings all find it by its name, the name of this file.
"""
import torch.nn.functional as F

from data import classifier_input


class Score:
    """Built by guidance.make_score with the stage's student and theta*, each with its view, and the guidance
    constants (omega from them)."""

    def __init__(self, student, student_view, reference, reference_view, guide):
        for model in (student, reference):
            model.eval().requires_grad_(False)  # important! eval mode, input gradients only
        self.student, self.student_view = student, student_view
        self.reference, self.reference_view = reference, reference_view
        self.omega = guide.omega

    def parts(self, images, classes):
        """images (N, C, H, W) in [-1, 1] -> {"S_H", "entropy", "reference_ce"}, each (N,); the score first."""
        log_p = F.log_softmax(self.student(classifier_input(images, self.student_view)), dim=1)
        entropy = -(log_p.exp() * log_p).sum(dim=1)  # high: the student is unsure
        reference_ce = F.cross_entropy(self.reference(classifier_input(images, self.reference_view)), classes,
                                       reduction="none")  # low: a valid example
        return dict(S_H=entropy - self.omega * reference_ce, entropy=entropy, reference_ce=reference_ce)
